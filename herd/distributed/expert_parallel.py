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

On a 2-D mesh ("dp", "ep") the experts are split over the "ep" ranks of each group (the all-to-alls
stay inside the group) and replicated across the "dp" groups (DTensor placements [Replicate(),
Shard(0)]): each replica's gradient covers its own group's tokens, so backward all-reduces it over
"dp" (one collective per layer for both weights), which gives the sum over every rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from ..model.moe import Experts, MoE, grouped_swiglu


class _ExpertGrads(torch.autograd.Function):
    """Identity on the two local weights; in backward their gradients times `scale`, summed over the
    replicas' `group` when there is one (a 2-D mesh)."""

    @staticmethod
    def forward(ctx, gate_up, down, scale, group):
        ctx.scale, ctx.group = scale, group
        return gate_up.view_as(gate_up), down.view_as(down)

    @staticmethod
    def backward(ctx, grad_gate_up, grad_down):
        grads = [grad_gate_up * ctx.scale, grad_down * ctx.scale]
        if ctx.group is not None:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=ctx.group)
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return grads[0], grads[1], None, None


class ExpertParallel(nn.Module):
    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        two_d = mesh.ndim == 2
        self.group = mesh.get_group("ep") if two_d else mesh.get_group()  # the all-to-all ranks
        self.replicas = mesh.get_group("dp") if two_d else None
        self.world = mesh["ep"].size() if two_d else mesh.size()
        self.grad_scale = 1.0 / mesh.size()  # FSDP's average is over every rank
        self.num_experts = experts.gate_up_proj.shape[0]
        if self.num_experts % self.world:
            raise ValueError(f"expert parallelism needs num_local_experts ({self.num_experts}) to be a multiple "
                             f"of the number of expert-parallel ranks ({self.world})")
        self.local = self.num_experts // self.world
        # Each rank keeps only its Shard(0): experts [rank*local, (rank+1)*local) of its group.
        placements = [Replicate(), Shard(0)] if two_d else [Shard(0)]
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.detach(), mesh, placements))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.detach(), mesh, placements))

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
        # fp32 shards (their gradients scaled and reduced in fp32), computed in the activations' dtype
        # (bf16 under mixed precision)
        gate_up, down = _ExpertGrads.apply(self.gate_up_proj.to_local(), self.down_proj.to_local(),
                                           self.grad_scale, self.replicas)
        gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
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
