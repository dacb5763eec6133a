"""herd's own C++ CPU kernels, built on first use: `int4_kernel()` gives `torch.ops.herd.int4_mm`
(herd/quant/int4_cpu.cpp, why it exists is written there) or None where it cannot run.

It runs on x86 CPUs with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4). The first call in
a process compiles it with `torch.utils.cpp_extension` (a C++ compiler and ninja, about 10 s; cached
under ~/.cache/torch_extensions after that). Where the CPU lacks VNNI, the build fails, or the
environment sets HERD_CPU_KERNELS=0, int4 layers use PyTorch's own kernel instead; nothing is
probed at import time.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("int4_cpu.cpp")
CPU_FLAGS = {"avx512f", "avx512bw", "avx512_vnni"}  # what the kernel is compiled for (-mavx512vnni etc.)
PACK_COLS, PACK_STEP, X_BLOCK = 32, 4, 32  # the packed layout's constants (see int4_cpu.cpp)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to check, so no kernel
        return set()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(flags.split(":", 1)[-1].split())


@functools.cache
def int4_kernel():
    """`torch.ops.herd.int4_mm`, built and loaded on the first call; None where it cannot run (the
    reason is warned once)."""
    if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
        return None
    if not CPU_FLAGS <= _cpu_flags():
        return None
    from torch.utils.cpp_extension import load

    try:
        load("herd_int4_cpu", [str(SOURCE)], extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni"],
             is_python_module=False)
    except Exception as e:  # no compiler, no ninja, ...: fall back, but say why
        warnings.warn(f"herd's int4 CPU kernel did not build ({type(e).__name__}: {str(e)[:200]}); int4 layers "
                      "use PyTorch's slower kernel", stacklevel=2)
        return None
    op = torch.ops.herd.int4_mm

    @torch.library.register_fake("herd::int4_mm")
    def _(x, packed, scale, offset, group):  # shapes for torch.compile
        return x.new_empty(x.shape[0], packed.shape[0] * PACK_COLS)

    return op


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's operands from int4 values q [(E,) N, K] (uint8 in 0..15) with w = (q - 8) * scale
    + zero per group: packed [(E,) N'/32, K/4, 64] uint8 and scales and offsets [(E,) N'/32, G, 32]
    (the offset folds in the -8: w = q * scale + offset). N' is N rounded up to 32 with zero weights;
    the kernel's extra outputs are zeros to slice off."""
    *lead, N, K = q.shape
    pad = -N % PACK_COLS
    offset = zero - 8 * scale
    if pad:
        q, scale, offset = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, offset))
    blocks = (N + pad) // PACK_COLS
    half = q.reshape(*lead, blocks, 2, PACK_COLS // 2, K // PACK_STEP, PACK_STEP)  # [.., b, nibble, j, s, t]
    packed = (half[..., 0, :, :, :] | (half[..., 1, :, :, :] << 4)).transpose(-3, -2)  # [.., b, s, j, t]
    packed = packed.reshape(*lead, blocks, K // PACK_STEP, 16 * PACK_STEP).contiguous()

    def per_block(t):  # [(E,) N', G] -> [(E,) N'/32, G, 32]
        return t.float().reshape(*lead, blocks, PACK_COLS, -1).transpose(-1, -2).contiguous()

    return packed, per_block(scale), per_block(offset)


def takes_int4(group: int) -> bool:
    """Whether the kernel takes int4 weights with this group size (any N; K a multiple of the group)."""
    return group % X_BLOCK == 0
