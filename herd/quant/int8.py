"""int8 weight-only quantization: one symmetric scale per output row.

w ~ q * scale with q in [-127, 127] and scale = max|w_row| / 127. A row is the natural group for
int8 (256 levels keep the rounding error small) and it is what PyTorch's CPU kernel
`torch._weight_int8pack_mm` takes; that kernel is fast only with bf16 activations, so activations are
rounded to bf16 for the matmul and the result is cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rowwise import RowwiseWeight


class Int8Weight(RowwiseWeight):
    """int8 [(E,) N, K] with symmetric per-row scales (herd.quant.rowwise)."""

    QMAX = 127.0

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__(qweight, scale)
        self._scale_bf16: torch.Tensor | None = None  # the kernel's copy of the scales (prepare_kernel)

    @staticmethod
    def encode(scaled: torch.Tensor) -> torch.Tensor:
        return torch.round(scaled).clamp(-127, 127).to(torch.int8)

    def prepare_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's inputs: the int8 weight and bf16 scales (made once, kept)."""
        if self._scale_bf16 is None or self._scale_bf16.device != self.scale.device:
            self._scale_bf16 = self.scale.to(torch.bfloat16)
        return self.qweight, self._scale_bf16

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if x.device.type != "cpu":  # no portable int8 GEMM: dequantize (correct, not fast)
            return F.linear(x, self.dequantize(expert).to(x.dtype))
        qweight, scale = self.prepare_kernel()
        if expert is not None:
            qweight, scale = qweight[expert], scale[expert]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), qweight, scale)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._scale_bf16 = None  # new scales: convert again on the next call
        super()._load_from_state_dict(*args, **kwargs)
