"""RMSNorm, and the weightless per-head L2 norm used for QK-norm."""

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 (bf16 sums of squares lose too much), then cast back to x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight multiplies after the cast back, as in the reference: part of logits parity.
        return rms_normalize(x, self.eps) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)
