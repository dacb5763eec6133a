"""Feed-forward layers: the dense SwiGLU and the token-choice mixture of experts (SPEC 2.2).

The MoE computes only what is routed: (token, expert) pairs are sorted by expert so that each
expert runs one matmul over its contiguous slice, and results are scatter-added back. Its cost
grows with top-k, not with the number of experts. The references instead run every expert on
every token and zero the unchosen ones (`moe_reference` below keeps that form as the slow, obvious
twin that the tests compare against).

Expert weights keep the Hugging Face layout, [E, D, 2I] (gate columns, then up) and [E, I, D],
already [in, out] for `x @ W`, so checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterStats:
    """What one MoE layer saw in a forward call, for load balancing and analytics."""

    logits: torch.Tensor  # [N_tokens, E] router logits (before any selection bias)
    top_experts: torch.Tensor  # [N_tokens, k] the experts each token was sent to
    _counts: torch.Tensor | None = field(default=None, repr=False)  # given where the layer already counted

    @property
    def counts(self) -> torch.Tensor:
        """[E] tokens routed to each expert (int64); counted when first asked (decoding never asks)."""
        if self._counts is None:
            self._counts = torch.bincount(self.top_experts.flatten(), minlength=self.logits.shape[-1])
        return self._counts


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on Hopper-class GPUs in bf16; everything else takes the loop."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights, applied to tokens already sorted by expert."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))  # [E, D, 2I]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))  # [E, I, D]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert, counts [E] -> [N, D]."""
        return grouped_swiglu(x, counts, self.gate_up_proj, self.down_proj)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each expert's SwiGLU on its contiguous slice: x [N, D] sorted by expert, counts [E],
    gate_up [E, D, 2I], down [E, I, D] -> [N, D]. (Also used by herd.distributed's expert
    parallelism on the experts a rank holds.)"""
    if _use_grouped_mm(x):
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x, gate_up, offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down, offs=offsets)

    def swiglu(e: int, x_e: torch.Tensor) -> torch.Tensor:
        gate, up = (x_e @ gate_up[e]).chunk(2, dim=-1)  # [n_e, I] each
        return (F.silu(gate) * up) @ down[e]  # [n_e, D]

    return per_expert(swiglu, x, counts)


def per_expert(expert_fn, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`expert_fn(e, x_e)` on each expert's contiguous slice x_e of x [N, D] (sorted by expert,
    counts [E]), skipping experts without tokens -> [N, D]. The loop every expert layout shares."""
    outs = [expert_fn(e, x_e) for e, x_e in enumerate(torch.split(x, counts.tolist())) if x_e.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


def route(logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None):
    """Top-k experts [N, k] of router logits [N, E] and their gates sigmoid(logit) [N, k] (not
    softmax, not renormalised). A selection bias only picks the experts; the gates stay those of
    the raw logits."""
    if selection_bias is None:
        top_logits, top_experts = torch.topk(logits, top_k, dim=-1)
    else:
        top_experts = torch.topk(logits.detach() + selection_bias, top_k, dim=-1).indices
        top_logits = logits.gather(1, top_experts)
    return top_experts, torch.sigmoid(top_logits.float()).to(logits.dtype)


class MoE(nn.Module):
    """out = shared(x) + sum over the top-k experts e of expert_e(sigmoid(logit_e) * x).

    The gate scales the expert's *input*; with SwiGLU that differs from scaling its output.

    `selection_bias` ([E] or None) is the hook for auxiliary-loss-free load balancing
    (herd.train.balance sets it from outside): it is added to the logits only to *choose* the
    top-k experts; the gates still come from the unbiased logits. It is a plain attribute, not a
    parameter or buffer, so it never enters the Hugging Face checkpoint; None (the default) keeps
    the forward exactly the reference's.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_local_experts, cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.selection_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)  # [N, E]
        top_experts, gates = route(logits, self.top_k, self.selection_bias)

        if x.shape[0] == 1:  # one token (decoding): its k experts need no sorting or scattering
            chosen, order = top_experts[0].sort()
            counts = torch.bincount(chosen, minlength=self.num_experts)
            routed_out = self.experts(x * gates[0, order, None], counts)  # [k, D]
            out = self.shared_expert(x) + routed_out.sum(0, keepdim=True)
            return out.view(shape), RouterStats(logits=logits, top_experts=top_experts, _counts=counts)

        # Sort the N*k (token, expert) pairs by expert so each expert sees one contiguous slice.
        flat_experts = top_experts.flatten()  # [N*k]
        order = torch.argsort(flat_experts, stable=True)
        token_of_pair = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        routed_in = x[token_of_pair] * gates.flatten()[order, None]  # [N*k, D]
        routed_out = self.experts(routed_in, counts)

        out = self.shared_expert(x).index_add(0, token_of_pair, routed_out)
        return out.view(shape), RouterStats(logits=logits, top_experts=top_experts, _counts=counts)


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The references' dense form: every expert on every token, unchosen gates zero. O(E) cost;
    for tests only."""
    x = x.reshape(-1, x.shape[-1])
    logits = moe.router(x)
    top_logits, top_experts = torch.topk(logits, moe.top_k, dim=-1)
    scores = torch.full_like(logits, float("-inf")).scatter(1, top_experts, top_logits)
    gates = torch.sigmoid(scores.float()).to(x.dtype)  # sigmoid(-inf) = 0 for unchosen experts
    out = moe.shared_expert(x)
    for e in range(moe.num_experts):
        gate, up = (x * gates[:, e : e + 1] @ moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + (F.silu(gate) * up) @ moe.experts.down_proj[e]
    return out
