"""The CUDA path of int4 and int8 layers, for the first GPU lent: are PyTorch's low-bit kernels right
and faster than dequantizing, and does a quantized load stay near the quantized size on the device?

    python benchmarks/cuda_lowbit.py [--load-gib 2] [--calls 50]

1. Kernels, on Scout's layer shapes at batch 1, 16 and 256: the error of the kernel against
   F.linear with the dequantized weight (fp32), and the median time per call of the kernel, of
   dequantize-then-matmul (the fallback) and of a bf16 F.linear, with the ratios.
2. Loading: a synthetic bf16 checkpoint (benchmarks/load_memory.py's wide config) loaded with
   `from_pretrained(device="cuda", quantize="int4")`: the device's peak allocation during the load
   against what it holds after it and against the bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from load_memory import checkpoint_facts, wide_config, write_random_checkpoint

SHAPES = [(5120, 5120), (16384, 5120), (5120, 8192)]  # (N out, K in): attention, expert gate+up, expert down
GiB = 2**30


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels(calls: int):
    from herd.quant.int4 import Int4Weight
    from herd.quant.int8 import Int8Weight

    print(f"{'format':<6}{'N x K':>13}{'M':>5}{'rel err':>9}{'kernel ms':>11}{'dequant ms':>12}{'bf16 ms':>9}"
          f"{'vs dequant':>12}{'vs bf16':>9}")
    for N, K in SHAPES:
        w = torch.randn(N, K, device="cuda") * 0.02
        dense = w.to(torch.bfloat16)
        for name, make in (("int4", lambda: Int4Weight.from_float(w, 32)), ("int8", lambda: Int8Weight.from_float(w))):
            layer, fallback = make(), make()  # the fallback's saved form stays on the device
            reference = fallback.dequantize()  # fp32
            if name == "int4":
                assert layer.prepare_kernel()[0] == "cuda", "tinygemm did not take this layer"
            for M in (1, 16, 256):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    y = layer(x).float()
                    exact = F.linear(x.float(), reference)
                    err = ((y - exact).norm() / exact.norm()).item()
                    t_kernel = median_ms(lambda: layer(x), calls)
                    t_dequant = median_ms(lambda: F.linear(x, fallback.dequantize().to(x.dtype)), calls)
                    t_dense = median_ms(lambda: F.linear(x, dense), calls)
                print(f"{name:<6}{f'{N}x{K}':>13}{M:>5}{err:>9.4f}{t_kernel:>11.4f}{t_dequant:>12.4f}{t_dense:>9.4f}"
                      f"{t_dequant / t_kernel:>11.2f}x{t_dense / t_kernel:>8.2f}x")


def load(gib: float):
    from herd.hf import from_pretrained

    tmp = Path(tempfile.mkdtemp(prefix="herd-cuda-load-", dir="/tmp"))
    try:
        write_random_checkpoint(wide_config(gib), tmp, 512 * 2**20)
        facts = checkpoint_facts(tmp)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = from_pretrained(tmp, device="cuda", quantize="int4")
        torch.cuda.synchronize()
        held, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
        layers = [m for m in model.modules() if hasattr(m, "prepare_kernel")]
        on_kernel = sum(m._kernel is not None and m._kernel[0] == "cuda" for m in layers)
        x = torch.randint(0, 1000, (1, 32), device="cuda")
        with torch.no_grad():
            assert torch.isfinite(model(x).logits).all()
    finally:
        shutil.rmtree(tmp)
    print(f"load: bf16 checkpoint {facts['bytes'] / GiB:.2f} GiB (largest tensor {facts['largest_tensor'] / GiB:.2f} "
          f"GiB); on the device after the load {held / GiB:.2f} GiB, peak during it {peak / GiB:.2f} GiB "
          f"(+{(peak - held) / GiB:.2f}); {on_kernel} of {len(layers)} int4 layers on tinygemm")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-gib", type=float, default=2.0)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_lowbit: needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    kernels(args.calls)
    load(args.load_gib)


if __name__ == "__main__":
    main()
