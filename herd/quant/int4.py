"""int4 weight-only quantization: asymmetric, one scale and offset per group of input columns.

Each row is cut into groups of `group_size` columns; within a group w ~ (q - 8) * scale + zero with
q in [0, 15], the form PyTorch's CPU kernel `torch._weight_int4pack_mm_for_cpu` computes. Sixteen
levels need small groups (32 by default) to keep the error tolerable.

Checkpoints store q as two nibbles per byte (column 2j in the low nibble, 2j + 1 in the high one),
a portable layout. CPU kernels want their own packing, made from the portable copy on the first CPU
call and kept beside it (on CPU an int4 layer therefore holds its weight twice: the saved form and
the kernel's form). Two kernels, picked per layer then:
- herd's own (herd/quant/lowbit_cpu.cpp, built on first use by cpu_kernels.py) on x86 CPUs with
  AVX-512 VNNI or AVX2: int8 activations times int4 weights, several times faster than PyTorch's at
  batch 1;
- otherwise PyTorch's `torch._weight_int4pack_mm_for_cpu` (bf16 activations).
Shapes neither takes (group not a multiple of 32, or without herd's kernel not 32/64/128/256 or N
not a multiple of 16) and other devices dequantize.

On CUDA, PyTorch's tinygemm kernel (herd/quant/cuda_kernels.py) where the GPU and the shape allow
it. There the kernel's form replaces the saved one on the device (which moves to host memory, for
state_dict and saving): a GPU holds each int4 weight once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import lowbit_kernel, lowbit_matmul, pack_int4, takes
from .cuda_kernels import int4_matmul, int4_operands, int4_runs_on, int4_takes

KERNEL_GROUPS = (32, 64, 128, 256)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # [..., N, K] uint8 in 0..15


class Int4Weight(nn.Module):
    """Stands in for an nn.Linear without bias; see the module docstring for the format. A stack of
    experts' weights has a leading expert dimension ([E, N, K/2] etc.); `forward(x, e)` then applies
    expert e's."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # [(E,) N, K/2] uint8, two nibbles per byte
        self.register_buffer("scale", scale)  # [(E,) N, K/group] fp32
        self.register_buffer("zero", zero)  # [(E,) N, K/group] fp32
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # tiled weight, scales+zeros (prepare_kernel)

    @property
    def group_size(self) -> int:
        return 2 * self.qweight.shape[-1] // self.scale.shape[-1]

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> "Int4Weight":
        """weight [(E,) N, K] (out, in). Groups of `group_size` columns, or the whole row where
        group_size does not divide K."""
        *lead, N, K = weight.shape
        if K % 2:
            raise ValueError(f"int4 needs an even number of input features, got a weight of shape {[*lead, N, K]}")
        group = group_size if K % group_size == 0 else K
        w = weight.detach().float().contiguous().unflatten(-1, (K // group, group))
        lo, hi = w.amin(-1), w.amax(-1)  # [(E,) N, G]
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zero = lo + 8 * scale  # so that q = 0 maps to the group minimum
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).flatten(-2)
        return cls(_pack_nibbles(q), scale, zero)

    @classmethod
    def cat(cls, parts: list["Int4Weight"]) -> "Int4Weight":
        """One layer whose outputs are those of `parts` side by side (their rows stacked); the parts
        must share a group size."""
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("Int4Weight.cat: the parts have different group sizes")
        joined = cls(*(torch.cat([getattr(p, n) for p in parts], -2) for n in ("qweight", "scale", "zero")))
        if all(p._kernel is not None and p._kernel[0] == "cuda" for p in parts):  # their saved forms are on the host
            joined._kernel = ("cuda", torch.cat([p._kernel[1] for p in parts], -4),  # tiles of 8 rows
                              torch.cat([p._kernel[2] for p in parts], -2))
        return joined

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """The full-precision weight [(E,) N, K], or expert e's [N, K]."""
        pick = (lambda t: t) if expert is None else (lambda t: t[expert])  # noqa: E731
        q = _unpack_nibbles(pick(self.qweight)).float()
        scale = pick(self.scale).repeat_interleave(self.group_size, dim=-1)
        zero = pick(self.zero).repeat_interleave(self.group_size, dim=-1)
        return (q - 8) * scale + zero

    def prepare_kernel(self, which: str | None = None) -> tuple | None:
        """The CPU kernel's operands, made once and kept: ("herd", packed, scales, offsets) for herd's
        kernel (any N) or ("aten", tiled weight, bf16 scales+zeros [(E,) G, N, 2]) for PyTorch's (N a
        multiple of 16); None where neither takes this shape. `which` ("herd" or "aten") picks one
        (benchmarks, tests); by default herd's wherever it runs. On CUDA: ("cuda", tiles, bf16
        scales+zeros) where tinygemm runs (_prepare_cuda)."""
        if self._kernel is not None and which in (None, self._kernel[0]):
            return self._kernel
        if self.qweight.device.type == "cuda":
            return self._prepare_cuda()
        if self.qweight.device.type != "cpu":
            return None
        q = _unpack_nibbles(self.qweight)
        if which is None:
            which = "herd" if takes(q.shape[-1], self.group_size) and lowbit_kernel() is not None else "aten"
        if which == "herd":
            self._kernel = ("herd", *pack_int4(q, self.scale, self.zero))
            return self._kernel
        if self.group_size not in KERNEL_GROUPS or q.shape[-2] % 16:
            return None
        tile = lambda w: torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.to(torch.int32), 1)  # noqa: E731
        tiled = tile(q) if q.ndim == 2 else torch.stack([tile(w) for w in q])
        scales_zeros = torch.stack([self.scale.transpose(-1, -2), self.zero.transpose(-1, -2)], dim=-1)
        self._kernel = ("aten", tiled, scales_zeros.to(torch.bfloat16).contiguous())
        return self._kernel

    def _prepare_cuda(self) -> tuple | None:
        """("cuda", tiles, bf16 scales+zeros) for tinygemm; the saved buffers then move to host memory."""
        if not (int4_runs_on(self.qweight.device) and int4_takes(self.qweight.shape[-2], 2 * self.qweight.shape[-1],
                                                                 self.group_size)):
            return None
        self._kernel = ("cuda", *int4_operands(self.qweight, self.scale, self.zero))
        for name in ("qweight", "scale", "zero"):
            self._buffers[name] = self._buffers[name].cpu()
        return self._kernel

    def kernel_matmul(self, rows: torch.Tensor, which: str, operands: list[torch.Tensor]) -> torch.Tensor:
        """rows [M, K] -> [M, N] through the kernel `which` and its operands (an expert's, if picked)."""
        if which == "cuda":
            return int4_matmul(rows, *operands, self.group_size)
        if which == "herd":
            return lowbit_matmul(rows, operands, self.group_size, 4, self.qweight.shape[-2])
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), operands[0], self.group_size,
                                                          operands[1])

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        kernel = self.prepare_kernel() if x.device.type in ("cpu", "cuda") else None
        if kernel is None:
            return F.linear(x, self.dequantize(expert).to(x.dtype))
        # Decoding calls this dozens of times a token: nothing here but the kernel and two casts.
        which, *operands = kernel
        if expert is not None:
            operands = [t[expert] for t in operands]
        y = self.kernel_matmul(x.reshape(-1, x.shape[-1]), which, operands)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None  # new weights: repack on the next call
        super()._load_from_state_dict(*args, **kwargs)
