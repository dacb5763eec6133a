"""The decode-time module swaps (herd.inference.fast) against the model's own modules, their slow
twin: same logits (full forward and cached decoding) and same greedy tokens, with and without
quantization."""

import copy

import pytest
import torch

from herd.inference import generate, pad_prompts
from herd.inference.fast import (BlockedLinear, DecodeMoE, FastAttention, FusedSwiGLU, blocked_matmul,
                                 prepare_for_decoding)
from herd.quant import quantize_
from herd.quant.cpu_kernels import lowbit_kernel
from tests.test_inference import cached_logits, random_rows, tiny_model

pytestmark = pytest.mark.isa  # compiled decode steps and quantized kernels


def twins(method=None, **overrides):
    """A model (dense and MoE layers, top-2 routing) and its prepared copy."""
    model = tiny_model(moe_step=2, top_k=2, **overrides)
    if method is not None:
        quantize_(model, method)
    return model, prepare_for_decoding(copy.deepcopy(model))


def test_modules_are_swapped_and_prepare_is_idempotent():
    model, fast = twins()
    assert isinstance(fast.layers[0].self_attn, FastAttention)
    assert isinstance(fast.layers[0].feed_forward, FusedSwiGLU)  # moe_step=2: layer 0 dense
    assert isinstance(fast.layers[1].feed_forward, DecodeMoE)
    assert fast.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16 // 16, 64, 16)  # [out / 16, in, 16]
    assert prepare_for_decoding(fast) is fast
    with pytest.raises(ValueError, match="quantize first"):
        quantize_(fast, "int8")


@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_fast_logits_equal_plain(method):
    """Full forward and prefill + cached decoding on a left-padded batch (past chunk boundaries
    and floor_scale): the prepared model gives the plain model's logits."""
    model, fast = twins(method)
    ids, mask = pad_prompts(random_rows([11, 3]), pad_id=0)
    continuation = torch.randint(3, 240, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached_logits(fast, ids, mask, None, continuation, prefill_chunk=4),
                               cached_logits(model, ids, mask, None, continuation, prefill_chunk=4),
                               rtol=1e-4, atol=1e-4)


def use_aten_kernels(model) -> None:
    """Holds every quantized layer of `model` to PyTorch's CPU kernels (by default, layers whose
    shape herd's kernel takes use it)."""
    for m in model.modules():
        if hasattr(m, "prepare_kernel"):
            m.prepare_kernel("aten")


# The greedy gap each kernel allows. PyTorch's kernels multiply float activations by the
# dequantized weights, so the prepared and plain models differ only by float reordering. herd's
# kernels round activations to int8 (one scale per 32 inputs): a 1e-7 reordering difference can
# move one activation across a rounding boundary, and the plain model's own full forward and
# cached decoding already part by up to 0.08 in logits that way (measured on the models below).
# A broken fast module parts them by whole units.
GREEDY_GAP = {"aten": 1e-3, "herd": 0.15}


@pytest.mark.parametrize("method, kernel", [(None, None), ("int8", "aten"), ("int8", "herd"), ("int4", "aten"),
                                            ("int4", "herd")])
def test_fast_greedy_tokens_equal_plain(method, kernel):
    """Batch 1 (the few-token MoE path) and batch 3 (the grouped path), with a selection bias:
    the same tokens in full precision; quantized, tokens the plain model would choose too."""
    if kernel == "herd" and lowbit_kernel() is None:
        pytest.skip("herd's low-bit CPU kernel does not run on this machine")
    model, fast = twins(method)
    bias = torch.tensor([0.0, 0.3, -0.2, 0.1])
    for m in (model, fast):
        if kernel == "aten":
            use_aten_kernels(m)
        for layer in m.layers:
            if layer.is_moe:
                layer.feed_forward.selection_bias = bias
    for rows in (random_rows([9], seed=2), random_rows([7, 7, 7], seed=4)):
        ids = torch.tensor(rows)
        out = generate(fast, ids, 12, temperature=0.0, stop_token_ids=[])
        if method is None:
            assert torch.equal(out, generate(model, ids, 12, temperature=0.0, stop_token_ids=[]))
            continue
        # Each token the prepared model chose must be a greedy choice of the plain model on the same
        # path (prefill, then cached decoding of those tokens), up to the kernel's rounding noise.
        new = out[:, ids.shape[1]:]
        with torch.no_grad():
            logits = cached_logits(model, ids, torch.ones_like(ids), None, new[:, :-1], prefill_chunk=1024)
        chosen = logits.gather(-1, new[..., None])[..., 0]
        assert (logits.amax(-1) - chosen).max() < GREEDY_GAP[kernel]


def test_gathered_experts_equal_the_dense_reference():
    """The no-host-read expert path (accelerators, compiled graphs) against `moe_reference`."""
    from herd.model.moe import moe_reference

    model, fast = twins()
    moe, decode_moe = model.layers[1].feed_forward, fast.layers[1].feed_forward
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top_logits, top_experts = torch.topk(decode_moe.router(x), 2, dim=-1)
        got = decode_moe.shared_expert(x) + decode_moe._gathered(x, top_experts, torch.sigmoid(top_logits))
        torch.testing.assert_close(got, moe_reference(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_features", [48, 40])  # 40: padded to three blocks of 16
def test_blocked_matmul_equals_linear(out_features):
    """Every path of the blocked layout (one row compiled, a few rows, many rows) computes x @ W.T."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, 24, generator=g)
    layer = BlockedLinear(weight)
    assert layer.weight.shape == (3, 24, 16)
    for rows in (1, 3, 40):
        x = torch.randn(2, rows, 24, generator=g)
        torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 24, generator=g)
    compiled = torch.compile(blocked_matmul, fullgraph=True)  # the single-row streaming reduction
    torch.testing.assert_close(compiled(x, layer.weight, out_features), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_compiled_step_gives_the_eager_tokens():
    """The compile test (about 60 s on CPU): a left-padded batch past a chunk boundary, a second
    prompt length that reuses the graph (cache sizes are rounded up), a batch of more (token,
    expert) pairs than the few-token MoE takes, int8 and int4 copies (int4 runs
    herd's own CPU kernel where it builds) and a deep copy of the same model, which must each get
    their own graph (its guards skip the modules: a shared graph would run the first model's code
    or weights on them)."""
    model, fast = twins()
    with pytest.raises(ValueError, match="prepare_for_decoding"):
        generate(model, torch.tensor([[5, 6]]), 2, compile=True)
    int8, int4 = (prepare_for_decoding(quantize_(copy.deepcopy(model), m)) for m in ("int8", "int4"))
    ids, mask = pad_prompts(random_rows([6, 3], seed=6), pad_id=0)

    def check(m, n=0):
        ids_n, mask_n = ids[:, n:], mask[:, n:]
        eager = generate(m, ids_n, 10, temperature=0.0, attention_mask=mask_n, stop_token_ids=[])
        compiled = generate(m, ids_n, 10, temperature=0.0, attention_mask=mask_n, stop_token_ids=[], compile=True)
        assert torch.equal(compiled, eager)
        return compiled

    check(fast, 0)
    check(fast, 1)
    check(int8)
    check(int4)
    # 3 rows x top-2: more (token, expert) pairs than the few-token path takes, so full-precision
    # experts are gathered inside the graph and quantized ones loop over the pairs.
    ids, mask = pad_prompts(random_rows([5, 2, 4], seed=7), pad_id=0)
    check(fast)
    check(int4)
    # A deep copy with other weights (after the original compiled) decodes with its own weights.
    other = copy.deepcopy(fast)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)
    assert not torch.equal(check(other), check(fast))
