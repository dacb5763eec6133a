"""`parallelize(model, mesh)`: expert parallelism, then FSDP2, applied to an unmodified Llama4.

FSDP2 (`fully_shard`) shards every parameter's dim 0 over the mesh and gathers a block's weights
just before its forward and backward. Each decoder layer and vision layer is its own unit, so only
one block is ever gathered at a time; the root unit holds the embeddings, final norm and lm_head.
The experts are already split by expert parallelism and are left out of FSDP (`ignored_params`).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from .expert_parallel import apply_expert_parallel


def parallelize(model: nn.Module, mesh: DeviceMesh, expert_parallel: bool = True) -> nn.Module:
    ignored = set(apply_expert_parallel(model, mesh)) if expert_parallel else set()
    blocks = list(model.layers) + (list(model.vision.layers) if getattr(model, "vision", None) is not None else [])
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    return model
