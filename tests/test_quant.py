"""Weight-only quantization: each format against its own dequantized twin, whole-model error bounds,
cached decoding on a quantized model, and quantized checkpoints saved and loaded."""

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.config import from_hf_dict
from herd.inference import generate
from herd.model import Llama4
from herd.quant import QuantExperts, quantize_
from herd.quant.fp8 import Fp8Weight
from herd.quant.cpu_kernels import lowbit_kernel
from herd.quant.int4 import Int4Weight
from herd.quant.int8 import Int8Weight
from tests.hf_reference import hf_config_dict, randomize_

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


@pytest.mark.parametrize("make", [lambda w: Int4Weight.from_float(w, 64), Int8Weight.from_float])
def test_herd_lowbit_kernel_does_its_arithmetic(make):
    """herd's int4/int8 CPU kernel computes x @ dequant(W).T with x rounded to int8, one scale per
    32 inputs: checked against that arithmetic written in PyTorch, for stacked experts, several rows
    and an N that the kernel pads (48 -> 64 for int4's blocks of 32, a multiple of int8's 16)."""
    if lowbit_kernel() is None:
        pytest.skip("herd's low-bit kernel needs an x86 CPU with AVX-512 VNNI and a C++ compiler")
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(2, 48, 128, generator=g), torch.randn(5, 128, generator=g)
    q = make(w)
    assert q.prepare_kernel()[0] == "herd"
    blocks = x.view(5, 4, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    x8 = (torch.round(blocks / scale) * scale).view(5, 128)
    for e in range(2):
        torch.testing.assert_close(q(x, e), x8 @ q.dequantize(e).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda w: Int4Weight.from_float(w, 32), Int8Weight.from_float])
def test_pytorch_kernels_where_herd_has_none(make):
    """PyTorch's int4 and int8 kernels (what layers run on CPUs without VNNI) compute the product too."""
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
    model.save_pretrained(tmp_path / "full")
    loaded = herd.from_pretrained(tmp_path / "full", quantize=method)  # quantize at load time
    quantize_(model, method)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected)
    loaded.save_pretrained(tmp_path / "q")  # saved quantized: smaller, and loads back exactly
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
