"""`parallelize(model, mesh)`: expert parallelism, then FSDP2, applied to an unmodified Llama4.

FSDP2 (`fully_shard`) shards every parameter's dim 0 over the mesh and gathers a block's weights
just before its forward and backward. Each decoder layer and vision layer is its own unit, so only
one block is ever gathered at a time; the root unit holds the embeddings, final norm and lm_head.
The experts are already split by expert parallelism and are left out of FSDP (`ignored_params`).
On a 2-D mesh ("dp", "ep") `fully_shard` is HSDP: each weight is sharded over the "ep" ranks of a
group and replicated across groups, its gradient reduce-scattered in the group and all-reduced
across groups.

`param_dtype=torch.bfloat16` is mixed precision the FSDP2 way: the sharded parameters, gradients
and optimiser states stay fp32; each block's weights are gathered and computed in bf16, and the
gradients are reduced across ranks in fp32 (`reduce_dtype`), so no update is summed in bf16. The
experts, outside FSDP, cast their local fp32 shard to the activations' dtype the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .expert_parallel import apply_expert_parallel


def parallelize(model: nn.Module, mesh: DeviceMesh, expert_parallel: bool = True,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    ignored = set(apply_expert_parallel(model, mesh)) if expert_parallel else set()
    precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = list(model.layers) + (list(model.vision.layers) if getattr(model, "vision", None) is not None else [])
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored or None, mp_policy=precision)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None, mp_policy=precision)
    return model
