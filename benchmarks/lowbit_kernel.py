"""herd's low-bit CPU kernel against PyTorch's int4 and int8 kernels, matrix by matrix (the shapes of
the decode benchmark's model), at 1, 16 and 512 rows. Both kernels see the same layer; "herd" is
what a layer runs where the CPU has AVX-512 VNNI or AVX2 (the path the CPU's flags choose, printed
first; HERD_CPU_KERNELS=avx2 times the AVX2 path on an AVX-512 machine), "pytorch" what it runs
elsewhere. Weights are hot (one matrix, called again and again) and the kernels are called directly
(not through the layer's Python forward, whose overhead is the same for both), so this compares the
kernels alone.

    python benchmarks/lowbit_kernel.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from herd.quant.cpu_kernels import kernel_isa, lowbit_kernel
from herd.quant.int4 import Int4Weight
from herd.quant.int8 import Int8Weight

SHAPES = {"qkv [384, 256]": (384, 256), "expert gate_up [1024, 256]": (1024, 256),
          "expert down [256, 512]": (256, 512), "lm_head [8192, 256]": (8192, 256)}


def best_times(fns, rounds: int = 10, seconds: float = 0.04) -> list[float]:
    """Best time per call of each function over `rounds` rounds that run each in turn for about
    `seconds`: interleaved, so that a slow spell on a shared machine hits both kernels alike."""
    for fn in fns:
        fn()
    calls = [max(1, int(seconds / max(1e-6, timed(fn)))) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        best = [min(b, timed(fn, n)) for b, fn, n in zip(best, fns, calls)]
    return best


def timed(fn, n: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def kernel_call(layer, x: torch.Tensor):
    """The bare kernel call `layer` makes for x [M, K] (what its forward runs, minus the Python)."""
    which, *ops = layer._kernel
    if which == "herd":
        bits = 4 if isinstance(layer, Int4Weight) else 8
        group = layer.group_size if bits == 4 else x.shape[-1]
        return lambda: torch.ops.herd.lowbit_mm(x, *ops, group, bits)
    xb = x.to(torch.bfloat16)
    if isinstance(layer, Int4Weight):
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, ops[0], layer.group_size, ops[1])
    return lambda: torch._weight_int8pack_mm(xb, *ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(ap.parse_args().threads)
    if lowbit_kernel() is None:
        raise SystemExit("herd's low-bit kernel is not available here (needs AVX-512 VNNI or AVX2 and a C++ compiler)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; herd's kernel: its {kernel_isa()} path")
    print(f"| {'format':<6} | {'matrix':<26} | {'rows':>4} | {'pytorch us':>10} | {'herd us':>8} | herd speed-up")
    print(f"|{'-' * 8}|{'-' * 28}|{'-' * 6}|{'-' * 12}|{'-' * 10}|------")
    g = torch.Generator().manual_seed(0)
    for fmt, make in (("int4", lambda w: Int4Weight.from_float(w, 32)), ("int8", Int8Weight.from_float)):
        for name, (N, K) in SHAPES.items():
            herd = make(torch.randn(N, K, generator=g) / K**0.5)
            pytorch = make(torch.randn(N, K, generator=g) / K**0.5)
            herd.prepare_kernel("herd")
            pytorch.prepare_kernel("aten")
            for rows in (1, 16, 512):
                x = torch.randn(rows, K, generator=g)
                t_pt, t_herd = best_times([kernel_call(pytorch, x), kernel_call(herd, x)])
                print(f"| {fmt:<6} | {name:<26} | {rows:>4} | {t_pt * 1e6:10.1f} | {t_herd * 1e6:8.1f} | {t_pt / t_herd:.1f}x")


if __name__ == "__main__":
    main()
