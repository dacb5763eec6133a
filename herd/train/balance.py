"""MoE load balancing for training (SPEC 2.2), applied to the model from outside.

Two methods, selectable (`TrainConfig.balance`):
- "bias": DeepSeek-V3's auxiliary-loss-free balancing. Each MoE layer gets a per-expert bias that
  is added to the router logits only to *choose* experts (`MoE.selection_bias`); gate values still
  come from the raw logits, so the bias steers load without distorting the output. After every
  optimiser step: bias += rate * sign(mean_count - count), with counts summed over the step's
  micro-batches and all-reduced across data-parallel ranks so every rank holds the same bias.
- "aux": the classic auxiliary loss, E * sum_e f_e * p_e per layer (f_e the fraction of routed
  pairs sent to expert e, p_e its mean normalised router affinity), added to the loss with
  `aux_weight`. Llama 4's router uses sigmoid gates, so affinities are sigmoids normalised over
  experts per token (as in DeepSeek-V3's sequence-wise variant) rather than a softmax.

Either way the per-layer load (fraction of pairs per expert) is recorded every step; router
collapse, nearly all tokens on one expert, shows up as one bright cell per row in the heatmap.
The bias lives here and in the training checkpoint, never in the Hugging Face checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE, RouterStats


class LoadBalancer:
    def __init__(self, model: nn.Module, mode: str = "bias", rate: float = 1e-3, aux_weight: float = 1e-2):
        if mode not in ("bias", "aux", "none"):
            raise ValueError(f"balance must be 'bias', 'aux' or 'none', got {mode!r}")
        self.mode, self.rate, self.aux_weight = mode, rate, aux_weight
        self.layers: list[MoE] = [m for m in model.modules() if isinstance(m, MoE)]
        self.num_experts = self.layers[0].num_experts if self.layers else 0
        device = next(model.parameters()).device
        self._counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64, device=device)
        if mode == "bias":  # a bias from an earlier stage carries on
            for moe in self.layers:
                if moe.selection_bias is None:
                    moe.selection_bias = torch.zeros(self.num_experts, device=device)

    # ------------------------------------------------------------------ per micro-batch
    def observe(self, router: list[RouterStats]) -> None:
        """Adds one forward's routing counts (one RouterStats per MoE layer)."""
        for i, stats in enumerate(router):
            self._counts[i] += stats.counts.to(self._counts)

    def aux_loss(self, router: list[RouterStats]) -> torch.Tensor | None:
        """aux_weight * sum over layers of E * sum_e f_e * p_e, or None unless mode is "aux"."""
        if self.mode != "aux" or not router:
            return None
        total = 0.0
        for stats in router:
            affinity = torch.sigmoid(stats.logits.float())  # [N, E]
            p = (affinity / affinity.sum(-1, keepdim=True)).mean(0)  # [E] mean normalised affinity
            f = stats.counts.float() / stats.counts.sum().clamp(min=1)  # [E] fraction routed
            total = total + self.num_experts * (f * p).sum()
        return self.aux_weight * total

    # ------------------------------------------------------------------ per optimiser step
    @torch.no_grad()
    def step(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Ends an optimiser step: all-reduces the counts, updates the biases, returns the load
        [layers, E] (fractions of routed pairs) and starts counting afresh."""
        counts = self._counts
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(counts, group=group)
        if self.mode == "bias":
            mean = counts.mean(dim=1, keepdim=True)
            for moe, delta in zip(self.layers, torch.sign(mean - counts)):
                moe.selection_bias += self.rate * delta.to(moe.selection_bias)
        load = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        self._counts = torch.zeros_like(counts)
        return load.float().cpu()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.mode != "bias" or not self.layers:  # a dense model has no bias to keep
            return {}
        return {"bias": torch.stack([moe.selection_bias for moe in self.layers]).cpu()}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "bias" and "bias" in state:
            for moe, bias in zip(self.layers, state["bias"]):
                moe.selection_bias = bias.to(moe.selection_bias)

    def detach(self) -> None:
        """Removes the selection biases: the model is the plain reference forward again."""
        for moe in self.layers:
            moe.selection_bias = None
