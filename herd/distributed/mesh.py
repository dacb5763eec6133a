"""The process group and device mesh, from the environment torchrun sets.

herd uses one mesh dimension: every rank is a data-parallel rank (FSDP shards each weight over all
of them), and the routed experts are split over the same ranks (expert parallelism). Larger
layouts add a second dimension (e.g. FSDP inside a node, replicas across nodes); the model code
would not change, only this file and `parallelize`.
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


def init_distributed() -> ParallelContext | None:
    """Joins the process group torchrun described (RANK, WORLD_SIZE, MASTER_ADDR, ...); returns
    None when the process was not started by torchrun or runs alone. NCCL on GPUs, gloo on CPUs."""
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
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    return ParallelContext(mesh, dist.get_rank(), world, device)
