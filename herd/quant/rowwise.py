"""What int8 and FP8 weights share: one scale per output row, w ~ q * scale with
scale = max|w_row| / QMAX, so the row's largest weight lands on the format's largest value."""

from __future__ import annotations

import torch
from torch import nn


class RowwiseWeight(nn.Module):
    """Stands in for an nn.Linear without bias: y = x @ (qweight * scale).T, qweight [N, K].
    A stack of experts' weights has a leading expert dimension ([E, N, K]); `forward(x, e)` then
    applies expert e's. Subclasses give QMAX, `encode` and the matmul."""

    QMAX: float

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # [(E,) N, K]
        self.register_buffer("scale", scale)  # [(E,) N] fp32

    @staticmethod
    def encode(scaled: torch.Tensor) -> torch.Tensor:
        """Weights divided by their row's scale (within +-QMAX) -> the stored format."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "RowwiseWeight":
        """weight [(E,) N, K] (out, in) -> the stored format with one scale per row."""
        w = weight.detach().float().contiguous()
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / cls.QMAX  # [(E,) N]; the clamp keeps zero rows finite
        return cls(cls.encode(w / scale[..., None]), scale)

    @classmethod
    def cat(cls, parts: list["RowwiseWeight"]) -> "RowwiseWeight":
        """One layer whose outputs are those of `parts` side by side (their rows stacked)."""
        return cls(torch.cat([p.qweight for p in parts], -2), torch.cat([p.scale for p in parts], -1))

    def pick(self, expert: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, scale) of the whole layer, or of expert e in a stack."""
        return (self.qweight, self.scale) if expert is None else (self.qweight[expert], self.scale[expert])

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        qweight, scale = self.pick(expert)
        return qweight.float() * scale[..., None]
