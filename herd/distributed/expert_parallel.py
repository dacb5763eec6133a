"""Expert parallelism: the routed experts split across ranks, tokens exchanged with all-to-all.

`ExpertParallel` replaces a MoE layer's `Experts` from outside. It receives what `Experts` receives
(this rank's routed tokens sorted by expert, and the count per expert) and returns the same thing,
so the MoE layer does not know it is distributed:

    1. all-to-all of the counts: each rank learns how many tokens every rank sends to its experts
    2. all-to-all of the tokens: rank r receives the tokens routed to experts [r*E_l, (r+1)*E_l)
    3. regroup the received tokens by local expert, run the experts, undo the regrouping
    4. all-to-all back: every token returns to the rank it came from, in its original order

Every rank must run the same collectives in the same order, in backward too: a rank that received
no tokens still passes an (empty) tensor through the graph, or its peers would wait forever in the
backward all-to-all, and gives its experts a zero gradient (as one process would for its unused
experts' rows), or gradient clipping would reduce a different set of tensors on each rank.

The local expert weights are the rank's Shard(0) of a DTensor over the mesh, so checkpoints and
gradient clipping see the whole tensor. Their gradients arrive summed over every rank's tokens,
while FSDP *averages* the other gradients over ranks; the training loop undoes the average, so the
expert gradients are divided by the world size here to match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..model.moe import Experts, MoE, grouped_swiglu


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallel(nn.Module):
    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.num_experts = experts.gate_up_proj.shape[0]
        if self.num_experts % self.world:
            raise ValueError(f"expert parallelism needs num_local_experts ({self.num_experts}) to be a multiple "
                             f"of the number of ranks ({self.world})")
        self.local = self.num_experts // self.world
        # Each rank keeps only its Shard(0): experts [rank*local, (rank+1)*local).
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.detach(), mesh, [Shard(0)]))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.detach(), mesh, [Shard(0)]))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by (global) expert, counts [E] -> [N, D] in the same order."""
        W, L = self.world, self.local
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # [W*L]: source s, local expert e
        recv = recv.view(W, L)
        send_split = counts.view(W, L).sum(1).tolist()
        recv_split = recv.sum(1).tolist()
        received = all_to_all_single_autograd(x.contiguous(), recv_split, send_split, self.group)
        # Received rows are ordered (source, expert); the experts want (expert, source).
        sizes = recv.flatten()
        starts = torch.cumsum(sizes, 0) - sizes  # start of block (s, e) in `received`
        by_expert = starts.view(W, L).t().flatten()  # blocks in (expert, source) order
        lengths = recv.t().flatten()
        perm = torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in zip(by_expert, lengths)]
                         ) if int(lengths.sum()) else torch.zeros(0, dtype=torch.long)
        perm = perm.to(x.device)
        # fp32 shards, computed in the activations' dtype (bf16 under mixed precision)
        gate_up = _ScaleGrad.apply(self.gate_up_proj.to_local().to(x.dtype), 1.0 / W)
        down = _ScaleGrad.apply(self.down_proj.to_local().to(x.dtype), 1.0 / W)
        if perm.numel():
            out = grouped_swiglu(received[perm], recv.sum(0), gate_up, down)
        else:  # nothing routed here: stay in the graph (the backward all-to-all) and give the local
            # experts a zero gradient, so every rank runs the same collectives (and clips the same set)
            out = received[perm] + 0.0 * (gate_up.sum() + down.sum())
        restored = torch.empty_like(out).index_copy(0, perm, out)  # back to (source, expert) order
        return all_to_all_single_autograd(restored, send_split, recv_split, self.group)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Swaps every MoE layer's experts for `ExpertParallel`; returns the new expert parameters."""
    params = []
    for module in model.modules():
        if isinstance(module, MoE):
            module.experts = ExpertParallel(module.experts, mesh)
            params += [module.experts.gate_up_proj, module.experts.down_proj]
    return params
