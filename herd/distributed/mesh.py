"""The process group and device mesh, from the environment torchrun sets.

Every rank is a data-parallel rank (it reads its own rows). By default the mesh has one dimension:
FSDP shards each weight over all ranks and the routed experts are split over the same ranks
(expert parallelism), so the world size must divide the number of experts. With
`expert_parallel=G` (G < world) the mesh has two, ("dp", "ep") = (world / G, G): FSDP and EP work
inside each group of G ranks (for instance one node) as above, and the world / G groups are
replicas whose gradients are all-reduced (HSDP for the dense weights; an explicit all-reduce for
the experts). Only this file and `parallelize` know; the model code does not change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelContext:
    mesh: DeviceMesh
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(expert_parallel: int = 0) -> ParallelContext | None:
    """Joins the process group torchrun described (RANK, WORLD_SIZE, MASTER_ADDR, ...); returns
    None when the process was not started by torchrun or runs alone. NCCL on GPUs, gloo on CPUs.
    `expert_parallel`: ranks per FSDP + expert-parallel group (0: all of them, a 1-D mesh)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend, device_type = "nccl", "cuda"
    else:
        device, backend, device_type = torch.device("cpu"), "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    world = dist.get_world_size()
    group = expert_parallel or world
    if group < 1 or world % group:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the number of processes ({world})")
    if group == world:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    else:
        mesh = init_device_mesh(device_type, (world // group, group), mesh_dim_names=("dp", "ep"))
    return ParallelContext(mesh, dist.get_rank(), world, device)
