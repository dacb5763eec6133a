"""int8 weight-only quantization: one symmetric scale per output row.

w ~ q * scale with q in [-127, 127] and scale = max|w_row| / 127. A row is the natural group for
int8 (256 levels keep the rounding error small) and it is what PyTorch's CPU kernel
`torch._weight_int8pack_mm` takes; that kernel is fast only with bf16 activations, so activations are
rounded to bf16 for the matmul and the result is cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Weight(nn.Module):
    """Stands in for an nn.Linear without bias: y = x @ dequant(qweight).T, qweight [N, K] int8.
    A stack of experts' weights has a leading expert dimension ([E, N, K]); `forward(x, e)` then
    applies expert e's."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # [(E,) N, K] int8
        self.register_buffer("scale", scale)  # [(E,) N] fp32
        self._scale_bf16: torch.Tensor | None = None  # the kernel's copy of the scales (prepare_kernel)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Weight":
        """weight [(E,) N, K] (out, in) -> per-row symmetric int8."""
        w = weight.detach().float().contiguous()
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # [(E,) N]; the clamp keeps zero rows finite
        q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    @classmethod
    def cat(cls, parts: list["Int8Weight"]) -> "Int8Weight":
        """One layer whose outputs are those of `parts` side by side (their rows stacked)."""
        return cls(torch.cat([p.qweight for p in parts], -2), torch.cat([p.scale for p in parts], -1))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[..., None]

    def prepare_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's inputs: the int8 weight and bf16 scales (made once, kept)."""
        if self._scale_bf16 is None or self._scale_bf16.device != self.scale.device:
            self._scale_bf16 = self.scale.to(torch.bfloat16)
        return self.qweight, self._scale_bf16

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if x.device.type != "cpu":  # no portable int8 GEMM: dequantize (correct, not fast)
            qweight, scale = (self.qweight, self.scale) if expert is None else (self.qweight[expert], self.scale[expert])
            return F.linear(x, (qweight.float() * scale[:, None]).to(x.dtype))
        qweight, scale = self.prepare_kernel()
        if expert is not None:
            qweight, scale = qweight[expert], scale[expert]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), qweight, scale)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._scale_bf16 = None  # new scales: convert again on the next call
        super()._load_from_state_dict(*args, **kwargs)
