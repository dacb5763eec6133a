"""PyTorch's CUDA kernels for int4 and int8 weights, and the run-time checks that say where they run.

- int4: `torch._weight_int4pack_mm` (tinygemm), bf16 activations times int4 weights kept in the
  kernel's tensor-core tile layout, w = (q - 8) * scale + zero per group: herd's own int4 format, so
  only the layout changes. It needs an NVIDIA GPU of compute capability 8.0 or newer, groups of
  32/64/128/256 columns, N a multiple of 8 and K a multiple of 32.
- int8: `torch._weight_int8pack_mm`, the op herd's CPU fallback calls, which has a CUDA kernel in
  recent PyTorch (a simple one: one thread per output; benchmarks/cuda_lowbit.py measures it
  against dequantize-then-matmul).
Everything is checked on the tensors' device when a layer first runs there, never at import; where a
check fails the layer dequantizes for each call. `int4_operands` also runs on the meta device, which
is how `herd params --deploy` counts the bytes a GPU holds.
"""

from __future__ import annotations

import torch

INT4_GROUPS = (32, 64, 128, 256)
K_TILE, N_TILE = 16, 8  # the tile layout's columns per k-tile and rows per n-tile


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA")


def int4_runs_on(device: torch.device) -> bool:
    """Whether tinygemm can run on `device`: CUDA (not ROCm, whose tiles differ), compute
    capability 8.0+, and a PyTorch build with the kernel."""
    return (device.type == "cuda" and torch.version.hip is None and _has_cuda_kernel("_weight_int4pack_mm")
            and torch.cuda.get_device_capability(device) >= (8, 0))


def int8_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and _has_cuda_kernel("_weight_int8pack_mm")


def inner_k_tiles(K: int) -> int | None:
    """k-tiles packed side by side in the layout (more is faster): the most that divide K."""
    return next((t for t in (8, 4, 2) if K % (K_TILE * t) == 0), None)


def int4_takes(N: int, K: int, group: int) -> bool:
    return group in INT4_GROUPS and K % group == 0 and N % N_TILE == 0 and inner_k_tiles(K) is not None


def high_nibble_first(qweight: torch.Tensor) -> torch.Tensor:
    """herd's bytes hold column 2j in the low nibble and 2j + 1 in the high one; the kernel's
    layout conversion reads column 2j from the high nibble."""
    return (qweight << 4) | (qweight >> 4)


def int4_operands(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """herd's int4 buffers (qweight [(E,) N, K/2] uint8, scale and zero [(E,) N, G] fp32) -> the
    kernel's operands: tiles int32 [(E,) N/8, K/(16 t), 32, t/2] (t = inner_k_tiles(K)) and
    scales_zeros bf16 [(E,) G, N, 2]. The tiles hold the same bytes as qweight; the scales are
    halved by bf16."""
    K = 2 * qweight.shape[-1]
    tiles_per_word = inner_k_tiles(K)
    flat = high_nibble_first(qweight).reshape(-1, *qweight.shape[-2:])
    tiles = torch.stack([torch.ops.aten._convert_weight_to_int4pack(w.contiguous(), tiles_per_word) for w in flat])
    tiles = tiles.reshape(*qweight.shape[:-2], *tiles.shape[1:])
    scales_zeros = torch.stack([scale.transpose(-1, -2), zero.transpose(-1, -2)], dim=-1)
    return tiles, scales_zeros.to(torch.bfloat16).contiguous()


def int4_matmul(rows: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """rows [M, K] -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), tiles, group, scales_zeros)
