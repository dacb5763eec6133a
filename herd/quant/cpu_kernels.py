"""herd's own C++ CPU kernel for int4 and int8 weights, built on first use: `lowbit_kernel()` gives
`torch.ops.herd.lowbit_mm` (herd/quant/lowbit_cpu.cpp, which says why it exists) or None where it
cannot run; `pack_int4` / `pack_int8` make its operands from the portable stored forms.

It runs on x86 CPUs with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4) or AVX2 and FMA
(Intel since Haswell, AMD since Zen 1): one source built for one of the two instruction sets,
`kernel_isa()` says which, chosen from the CPU's flags on the first call (never at import). The
first call in a process compiles it with `torch.utils.cpp_extension` (a C++ compiler and ninja,
about 10 s; cached under ~/.cache/torch_extensions after that). Where the CPU has neither, the build
fails, or the environment sets HERD_CPU_KERNELS=0, quantized layers use PyTorch's own kernels.
HERD_CPU_KERNELS=avx2 or avx512 forces a path (tests of the AVX2 path on an AVX-512 machine).

The two builds register the same op, so a process loads only one.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("lowbit_cpu.cpp")
# instruction set -> (the CPU flags it needs, as /proc/cpuinfo names them; the compiler flags), best first
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512_vnni"}, ["-mavx512f", "-mavx512bw", "-mavx512vnni"]),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}
STEP, X_BLOCK = 4, 32  # inputs per byte group of a dot product; inputs per activation scale
BLOCK_COLS = {4: 32, 8: 16}  # output columns per packed block, by bits


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to check, so no kernel
        return set()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(flags.split(":", 1)[-1].split())


def runnable_isas() -> list[str]:
    """The kernel's instruction sets this CPU can run, best first."""
    flags = _cpu_flags()
    return [isa for isa, (needs, _) in ISAS.items() if needs <= flags]


@functools.cache
def kernel_isa() -> str | None:
    """The instruction set herd's kernel is built for in this process: HERD_CPU_KERNELS if it names
    one (an error if the CPU cannot run it), None if it is 0 or the CPU runs none, else the best."""
    wanted = os.environ.get("HERD_CPU_KERNELS", "1")
    if wanted == "0":
        return None
    runnable = runnable_isas()
    if wanted == "1":
        return runnable[0] if runnable else None
    if wanted not in ISAS:
        raise ValueError(f"HERD_CPU_KERNELS={wanted!r}: expected 0, 1 or one of {', '.join(ISAS)}")
    if wanted not in runnable:
        missing = ISAS[wanted][0] - _cpu_flags()
        raise RuntimeError(f"HERD_CPU_KERNELS={wanted}, but this CPU lacks {', '.join(sorted(missing))}")
    return wanted


@functools.cache
def lowbit_kernel():
    """`torch.ops.herd.lowbit_mm`, built for `kernel_isa()` and loaded on the first call; None where
    it cannot run (a failed build is warned once)."""
    isa = kernel_isa()
    if isa is None:
        return None
    from torch.utils.cpp_extension import load

    try:
        load(f"herd_lowbit_{isa}", [str(SOURCE)], extra_cflags=["-O3", *ISAS[isa][1]], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, ...: fall back, but say why
        warnings.warn(f"herd's low-bit CPU kernel ({isa}) did not build ({type(e).__name__}: {str(e)[:200]}); "
                      "int4/int8 layers use PyTorch's slower kernels", stacklevel=2)
        return None

    @torch.library.register_fake("herd::lowbit_mm")
    def _(x, packed, scale, offset, group, bits):  # output shape, for torch.compile
        return x.new_empty(x.shape[0], packed.shape[0] * BLOCK_COLS[bits])

    return torch.ops.herd.lowbit_mm


def lowbit_matmul(rows: torch.Tensor, operands: list[torch.Tensor], group: int, bits: int,
                  out_features: int) -> torch.Tensor:
    """rows [M, K] @ the packed weight (`operands`: packed, scales, offsets) -> [M, out_features] fp32,
    the block padding sliced off."""
    return torch.ops.herd.lowbit_mm(rows.float(), *operands, group, bits)[:, :out_features]


def takes(K: int, group: int) -> bool:
    """Whether the kernel takes a weight with K inputs and this group size (any number of outputs)."""
    return group % X_BLOCK == 0 and K % group == 0


def _pack(u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """u [(E,) N, K] unsigned values (0..15 or 0..255), scale and offset [(E,) N, G] -> packed
    [(E,) N'/cols, K/4, 64] uint8, scales and offsets [(E,) N'/cols, G, cols]. N' is N rounded up to
    the block with zero weights: the kernel's extra outputs are zeros to slice off."""
    *lead, N, K = u.shape
    cols = BLOCK_COLS[bits]
    pad = -N % cols
    if pad:
        u, scale, offset = (F.pad(t, (0, 0, 0, pad)) for t in (u, scale, offset))
    blocks = (N + pad) // cols
    if bits == 4:  # column j in the low nibble, column 16 + j in the high one
        halves = u.reshape(*lead, blocks, 2, 16, K)
        u = halves[..., 0, :, :] | (halves[..., 1, :, :] << 4)  # [.., blocks, 16, K]
    steps = u.reshape(*lead, blocks, 16, K // STEP, STEP).transpose(-3, -2)  # [.., blocks, K/4, 16, 4]
    packed = steps.reshape(*lead, blocks, K // STEP, 16 * STEP).to(torch.uint8).contiguous()

    def per_block(t):  # [(E,) N', G] -> [(E,) N'/cols, G, cols]
        return t.float().reshape(*lead, blocks, cols, -1).transpose(-1, -2).contiguous()

    return packed, per_block(scale), per_block(offset)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Operands for int4 values q [(E,) N, K] (0..15) with w = (q - 8) * scale + zero per group."""
    return _pack(q, scale, zero - 8 * scale, bits=4)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Operands for int8 values q [(E,) N, K] (-127..127) with w = q * scale per row: stored as q + 128,
    so the offset is -128 * scale, one group per row."""
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return _pack(u, scale[..., None], -128 * scale[..., None], bits=8)
