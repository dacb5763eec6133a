"""Weight-only quantization: each format against its own dequantized twin, whole-model error bounds,
cached decoding on a quantized model, and quantized checkpoints saved and loaded."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.config import from_hf_dict
from herd.inference import generate
from herd.model import Llama4
from herd.quant import QuantExperts, quantize_
from herd.quant.fp8 import Fp8Weight
from herd.quant import cpu_kernels
from herd.quant.cpu_kernels import ISAS, SOURCE, kernel_isa, lowbit_kernel, runnable_isas
from herd.quant.int4 import Int4Weight, _pack_nibbles
from herd.quant.int8 import Int8Weight
from tests.hf_reference import hf_config_dict, randomize_

pytestmark = pytest.mark.isa  # herd's low-bit kernel, per instruction set

# worst relative error of the whole model's logits (std 0.05 weights) allowed per format
LOGIT_ERROR = {"int8": 0.04, "fp8": 0.1, "int4": 0.3}


def model_and_ids(seed=0):
    model = Llama4(from_hf_dict(hf_config_dict(multimodal=False))).eval()
    randomize_(model, std=0.05, seed=seed)
    ids = torch.randint(3, 240, (2, 24), generator=torch.Generator().manual_seed(seed))
    return model, ids


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("make, weight_error", [
    (Int8Weight.from_float, 0.01),
    (lambda w: Int4Weight.from_float(w, 32), 0.12),
    (Fp8Weight.from_float, 0.05),
])
def test_weight_formats(make, weight_error):
    """Rounding error of the stored weight is small, and the kernel computes x @ dequant(W).T
    (up to the rounding of activations: to bf16, or to int8 in herd's int4 kernel)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=g), torch.randn(3, 5, 128, generator=g)
    q = make(w)
    assert rel_error(q.dequantize(), w) < weight_error
    expected = F.linear(x, q.dequantize())
    assert rel_error(q(x), expected) < 0.01
    assert q(x).shape == (3, 5, 64) and q(x).dtype == x.dtype


@pytest.mark.parametrize("make", [Int8Weight.from_float, lambda w: Int4Weight.from_float(w, 32),
                                  lambda w: Int4Weight.from_float(w, 16), Fp8Weight.from_float])
def test_stacked_expert_weights_equal_one_matrix_each(make):
    """Experts' weights quantized as one stack [E, N, K] give, for expert e, what expert e's matrix
    quantized alone gives (group 16: the int4 path without the CPU kernel)."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(3, 32, 64, generator=g), torch.randn(2, 64, generator=g)
    stacked = make(w)
    for e in range(3):
        torch.testing.assert_close(stacked(x, e), make(w[e])(x))


def needs_lowbit_kernel():
    if lowbit_kernel() is None:
        pytest.skip("herd's low-bit kernel needs an x86 CPU with AVX-512 VNNI or AVX2 and a C++ compiler")


def int8_activations(x):
    """x [M, K] rounded as herd's kernel rounds it: to int8, one scale per 32 inputs."""
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale) * scale).flatten(-2)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("make", [lambda w: Int4Weight.from_float(w, 32), lambda w: Int4Weight.from_float(w, 64),
                                  Int8Weight.from_float])
def test_lowbit_kernel_does_its_arithmetic(make, rows):
    """herd's int4/int8 CPU kernel, on this process's path (`kernel_isa()`), computes
    x @ dequant(W).T with x rounded to int8: checked against that arithmetic written in PyTorch, for
    stacked experts, one row and several, one group per 32 or 64 inputs (int4) or per row (int8),
    and an N that both formats pad (40 -> 64 for int4's blocks of 32, 48 for int8's 16)."""
    needs_lowbit_kernel()
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(2, 40, 128, generator=g), torch.randn(rows, 128, generator=g)
    q = make(w)
    assert q.prepare_kernel()[0] == "herd"
    for e in range(2):
        torch.testing.assert_close(q(x, e), int8_activations(x) @ q.dequantize(e).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_lowbit_kernel_at_the_extremes(bits):
    """Weights and activations at their largest magnitudes with every product of a column adding up:
    where a 16-bit multiply-add of the stored int8 weights (AVX2's vpmaddubsw, 2 * 255 * 127)
    would saturate, and the largest 16-bit partial sums of the AVX2 int4 path (8 steps of
    2 * 15 * 127). Rows 0 and 1 of the weight are all highest and all lowest, the rest random."""
    needs_lowbit_kernel()
    N, K = 32, 64
    high = torch.randint(0, 2, (N, K), generator=torch.Generator().manual_seed(6)).bool()
    high[0], high[1] = True, False
    if bits == 4:  # q 15 or 0, scale 1, zero 0: w = 7 or -8
        q = Int4Weight(_pack_nibbles(torch.where(high, 15, 0)), torch.ones(N, K // 32), torch.zeros(N, K // 32))
    else:  # q +-127 (stored as 255 and 1), scale 1
        q = Int8Weight(torch.where(high, 127, -127).to(torch.int8), torch.ones(N))
    assert q.prepare_kernel()[0] == "herd"
    sign = high.float() * 2 - 1
    x = torch.stack([torch.ones(K), -torch.ones(K), sign[2], -sign[2]])  # exact in int8: +-127 * (1 / 127)
    torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("isa", list(ISAS))
def test_lowbit_kernel_on_the_other_paths_this_cpu_runs(isa):
    """A process loads one build of the kernel (both register the same op), so the paths this one
    did not choose (AVX2 on an AVX-512 machine) run the kernel tests above in a subprocess that
    HERD_CPU_KERNELS forces onto them."""
    if isa not in runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    if isa == kernel_isa():
        pytest.skip(f"{isa} is this process's path, tested above")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "lowbit_kernel and not other_paths"], cwd=Path(__file__).parents[1],
                         env={**os.environ, "HERD_CPU_KERNELS": isa}, capture_output=True, text=True)
    assert run.returncode == 0 and "passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("isa", list(ISAS))
def test_kernel_source_compiles_for_every_isa(isa, tmp_path):
    """The builds this CPU cannot run still compile (the AVX-512 one on an AVX2 machine): compiled
    to an object file with their flags, not loaded. The runnable ones are built by the tests above."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("herd's kernel is x86 only")
    if isa in runnable_isas():
        pytest.skip(f"this CPU runs the {isa} path: built and tested above")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    includes = [f"-isystem{p}" for p in include_paths()]
    run = subprocess.run([compiler, "-std=c++20", "-O0", "-c", "-o", str(tmp_path / "kernel.o"), *ISAS[isa][1],
                          *includes, str(SOURCE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_kernel_isa_follows_the_cpu_and_the_environment(monkeypatch):
    """The path is chosen from the CPU's flags, best first; HERD_CPU_KERNELS=0 turns herd's kernel
    off and a path's name forces it, refused where the CPU cannot run it."""
    choose = cpu_kernels.kernel_isa.__wrapped__  # not cached
    both = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: both)
    monkeypatch.delenv("HERD_CPU_KERNELS", raising=False)
    assert choose() == "avx512"
    for value, expected in (("avx2", "avx2"), ("0", None), ("1", "avx512")):
        monkeypatch.setenv("HERD_CPU_KERNELS", value)
        assert choose() == expected
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    assert choose() == "avx2"
    monkeypatch.setenv("HERD_CPU_KERNELS", "avx512")
    with pytest.raises(RuntimeError, match="lacks avx512_vnni, avx512bw, avx512f"):
        choose()
    monkeypatch.setenv("HERD_CPU_KERNELS", "neon")
    with pytest.raises(ValueError, match="avx512, avx2"):
        choose()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx", "sse4_2"})  # or not x86, or not Linux
    monkeypatch.delenv("HERD_CPU_KERNELS")
    assert choose() is None


@pytest.mark.parametrize("make", [lambda w: Int4Weight.from_float(w, 32), Int8Weight.from_float])
def test_pytorch_kernels_where_herd_has_none(make):
    """PyTorch's int4 and int8 kernels (what layers run on CPUs without AVX2) compute the product too."""
    w, x = torch.randn(48, 128, generator=torch.Generator().manual_seed(5)), torch.randn(3, 128)
    q = make(w)
    assert q.prepare_kernel("aten")[0] == "aten" and q.prepare_kernel()[0] == "aten"  # kept once made
    assert rel_error(q(x), F.linear(x, q.dequantize())) < 0.01


def test_int4_groups_and_fallback():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q32 = Int4Weight.from_float(w, 32)
    assert q32.scale.shape == (48, 3) and q32.qweight.shape == (48, 48)
    # smaller groups are more precise; a group that does not divide K becomes the whole row
    assert rel_error(Int4Weight.from_float(w, 16).dequantize(), w) < rel_error(q32.dequantize(), w)
    assert Int4Weight.from_float(w, 64).scale.shape == (48, 1)
    x = torch.randn(2, 96)
    assert rel_error(q32(x), F.linear(x, q32.dequantize())) < 0.01  # N=48: kernel path


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_model_is_close_and_decodes_consistently(method):
    model, ids = model_and_ids()
    with torch.no_grad():
        reference = model(ids).logits
        quantize_(model, method)
        logits = model(ids).logits
    assert isinstance(model.layers[0].feed_forward.experts, QuantExperts)
    assert isinstance(model.layers[0].feed_forward.router, torch.nn.Linear)  # kept in full precision
    assert 0 < rel_error(logits, reference) < LOGIT_ERROR[method]
    # the cache and the full forward agree on the quantized model too
    out = generate(model, ids[:, :10], 8, temperature=0.0, stop_token_ids=[])
    with torch.no_grad():
        assert torch.equal(model(out).logits[:, 9:-1].argmax(-1), out[:, 10:])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, method):
    model, ids = model_and_ids(seed=3)
    herd.save_pretrained(model, tmp_path / "full")
    loaded = herd.from_pretrained(tmp_path / "full", quantize=method)  # quantize at load time
    quantize_(model, method)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected)
    herd.save_pretrained(loaded, tmp_path / "q")  # saved quantized: smaller, and loads back exactly
    full_bytes = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.6 * full_bytes
    again = herd.from_pretrained(tmp_path / "q")
    assert again.quantization["method"] == method
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected)
    with pytest.raises(ValueError, match="full-precision"):
        herd.from_pretrained(tmp_path / "q", quantize="fp8" if method != "fp8" else "int8")


def test_bad_quantize_options():
    model, _ = model_and_ids()
    with pytest.raises(ValueError, match="int8, int4, fp8"):
        quantize_(model, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_(model, "int4", group_size=7)
    quantize_(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, "int4")
