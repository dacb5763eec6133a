"""int8 weight-only quantization: one symmetric scale per output row.

w ~ q * scale with q in [-127, 127] and scale = max|w_row| / 127. A row is the natural group for
int8 (256 levels keep the rounding error small). Two CPU kernels, picked on the first call:
- herd's own (herd/quant/lowbit_cpu.cpp, via cpu_kernels.py) on x86 CPUs with AVX-512 VNNI or
  AVX2: int8 activations (one scale per 32 inputs) times the int8 weights; it needs K a multiple of
  32 and keeps a packed copy of the weight beside the saved one;
- otherwise PyTorch's `torch._weight_int8pack_mm`, which is fast only with bf16 activations, so
  activations are rounded to bf16 for the matmul and the result is cast back.
On CUDA the same PyTorch op where the build has its CUDA kernel (herd/quant/cuda_kernels.py);
other devices dequantize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernels import lowbit_kernel, lowbit_matmul, pack_int8, takes
from .cuda_kernels import int8_runs_on
from .rowwise import RowwiseWeight


class Int8Weight(RowwiseWeight):
    """int8 [(E,) N, K] with symmetric per-row scales (herd.quant.rowwise)."""

    QMAX = 127.0

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__(qweight, scale)
        self._kernel: tuple | None = None  # the CPU kernel's operands (prepare_kernel)

    @staticmethod
    def encode(scaled: torch.Tensor) -> torch.Tensor:
        return torch.round(scaled).clamp(-127, 127).to(torch.int8)

    def prepare_kernel(self, which: str | None = None) -> tuple:
        """The CPU kernel's operands, made once and kept: ("herd", packed, scales, offsets) for herd's
        kernel, or ("aten", the int8 weight, bf16 scales) for PyTorch's. `which` ("herd" or "aten")
        picks one (benchmarks, tests); by default herd's wherever it runs."""
        kept = self._kernel
        if kept is not None and which in (None, kept[0]) and kept[-1].device == self.scale.device:
            return kept
        if which is None:
            K = self.qweight.shape[-1]
            on_cpu = self.scale.device.type == "cpu"
            which = "herd" if on_cpu and takes(K, K) and lowbit_kernel() is not None else "aten"
        if which == "herd":
            self._kernel = ("herd", *pack_int8(self.qweight, self.scale))
        else:
            self._kernel = ("aten", self.qweight, self.scale.to(torch.bfloat16))
        return self._kernel

    def kernel_matmul(self, rows: torch.Tensor, which: str, operands: list[torch.Tensor]) -> torch.Tensor:
        """rows [M, K] -> [M, N] through the CPU kernel `which` and its operands (an expert's, if picked)."""
        if which == "herd":
            return lowbit_matmul(rows, operands, rows.shape[-1], 8, self.qweight.shape[-2])  # one group per row
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16), *operands)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if x.device.type != "cpu" and not int8_runs_on(x.device):  # dequantize (correct, not fast)
            return F.linear(x, self.dequantize(expert).to(x.dtype))
        which, *operands = self.prepare_kernel()
        if expert is not None:
            operands = [t[expert] for t in operands]
        y = self.kernel_matmul(x.reshape(-1, x.shape[-1]), which, operands)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None  # new weights: pack again on the next call
        super()._load_from_state_dict(*args, **kwargs)
