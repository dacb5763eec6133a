"""FP8 (e4m3) weights with one scale per output row: the format Maverick's experts ship in.

w ~ q * scale with q in float8_e4m3fn and scale = max|w_row| / 448 (e4m3's largest value). On GPUs
with FP8 tensor cores (compute capability 8.9 and up) the matmul runs in `torch._scaled_mm`, with
activations quantized per row on the fly (rowwise scales on both sides). Elsewhere, CPUs included,
the weight is dequantized for each call: FP8 then saves memory, not time (PyTorch's CPU
`_scaled_mm` is a slow reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rowwise import RowwiseWeight

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _fp8_matmul_available(x: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(x.device) >= (8, 9))


class Fp8Weight(RowwiseWeight):
    """float8_e4m3fn [(E,) N, K] with per-row scales (herd.quant.rowwise)."""

    QMAX = FP8_MAX

    @staticmethod
    def encode(scaled: torch.Tensor) -> torch.Tensor:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if not _fp8_matmul_available(x):
            return F.linear(x, self.dequantize(expert).to(x.dtype))
        qweight, scale = self.pick(expert)
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
        x8 = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(x8, qweight.t(), scale_a=x_scale, scale_b=scale[None, :].contiguous(),
                             out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)
        return y.to(x.dtype).view(*x.shape[:-1], -1)
