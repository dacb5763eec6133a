"""The model's fast paths against their slow, obvious twins, and its input errors."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from herd.config import ModelConfig, TextConfig
from herd.model import Llama4
from herd.model.attention import Attention, TokenLayout, temperature_scale
from herd.model.moe import MoE, moe_reference
from herd.model.rope import text_angles, text_inv_freq
from herd.model.vision import pixel_shuffle
from herd.presets import tiny
from tests.hf_reference import randomize_

pytestmark = pytest.mark.isa  # attention kernels and FlexAttention


def small_text(**kw) -> TextConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                attention_chunk_size=8, floor_scale=4, num_local_experts=4, interleave_moe_layer_step=2,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return TextConfig(**(base | kw))


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_moe_matches_dense_reference(top_k):
    moe = MoE(small_text(num_experts_per_tok=top_k, num_local_experts=6))
    randomize_(moe)
    one = torch.randn(1, 1, 64)  # the single-token (decoding) path
    torch.testing.assert_close(moe(one)[0], moe_reference(moe, one).view_as(one), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 11, 64, requires_grad=True)
    out, stats = moe(x)
    ref = moe_reference(moe, x).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert stats.counts.sum() == 33 * top_k and stats.logits.shape == (33, 6)
    # gradients agree too, for the input and every weight
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_moe_cost_grows_with_top_k_not_experts():
    def flops(**kw):
        moe = MoE(small_text(hidden_size=64, intermediate_size=256, **kw))
        with FlopCounterMode(display=False) as counter:
            moe(torch.randn(512, 64))
        return counter.get_total_flops()

    base = flops(num_local_experts=4, num_experts_per_tok=1)
    assert flops(num_local_experts=32, num_experts_per_tok=1) < 1.1 * base  # 8x the experts
    # top-2 doubles the routed work (the shared expert stays): 1 shared + 2 routed vs 1 + 1
    assert flops(num_local_experts=4, num_experts_per_tok=2) == pytest.approx(1.5 * base, rel=0.05)


def _attention(T, chunk, use_rope=True, layer=0):
    cfg = small_text(attention_chunk_size=chunk, no_rope_layer_interval=1 if not use_rope else 4)
    attn = Attention(cfg, layer)
    randomize_(attn)
    x = torch.randn(2, T, 64)
    positions = torch.arange(T).expand(2, T)
    rope = text_angles(positions, text_inv_freq(cfg.head_dim, cfg.rope_theta, None))
    fast = attn(x, rope, TokenLayout(positions, None, plain=True))
    masked = attn(x, rope, TokenLayout(positions, torch.zeros(2, T, dtype=torch.long)))
    return fast, masked


@pytest.mark.parametrize("T", [5, 8, 16, 21])
def test_chunk_folding_matches_explicit_mask(T):
    fast, masked = _attention(T, chunk=8)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_global_layer_fast_path_matches_explicit_mask():
    fast, masked = _attention(21, chunk=8, use_rope=False)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_chunks_really_limit_attention():
    """A RoPE layer's output at a chunk start does not depend on the tokens before it."""
    cfg = ModelConfig(text=small_text(no_rope_layer_interval=100), vision=None)  # RoPE layers only
    model = Llama4(cfg).eval()
    ids = torch.randint(3, 128, (1, 24))
    changed = ids.clone()
    changed[0, :8] = (changed[0, :8] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, 8:], b[0, 8:])
    assert not torch.allclose(a[0, :8], b[0, :8])


def test_packed_documents_match_separate_runs():
    model = Llama4(ModelConfig(text=small_text(), vision=None)).eval()
    randomize_(model, std=0.1)
    a, b = torch.randint(3, 128, (1, 13)), torch.randint(3, 128, (1, 19))
    docs = torch.tensor([[0] * 13 + [1] * 19])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), document_ids=docs).logits
        torch.testing.assert_close(packed[:, :13], model(a).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(packed[:, 13:], model(b).logits, rtol=1e-4, atol=1e-4)


def test_temperature_scale_only_past_floor_scale():
    pos = torch.tensor([0, 6, 7, 8, 100])
    scale = temperature_scale(pos, attn_scale=0.1, floor_scale=8)
    assert scale[:2].tolist() == [1.0, 1.0]  # p < floor_scale - 1
    assert scale[2].item() == pytest.approx(1 + 0.1 * math.log(2))
    assert scale[4].item() == pytest.approx(1 + 0.1 * math.log1p(101 // 8))


def test_pixel_shuffle_concatenates_2x2_blocks():
    g = 4  # a 4x4 grid of patches whose features are their (row, col)
    grid = torch.tensor([[r, c] for r in range(g) for c in range(g)], dtype=torch.float)[None]
    out = pixel_shuffle(grid)  # [1, 4, 8]
    assert out.shape == (1, 4, 8)
    # output token (r=0, c=1) holds patches (0,2), (0,3), (1,2), (1,3)
    assert out[0, 1].tolist() == [0, 2, 0, 3, 1, 2, 1, 3]


def test_image_token_count_mismatch_names_both_counts():
    model = Llama4(tiny()).eval()
    cfg = model.config
    ids = torch.full((1, 40), 5)
    ids[0, 2:2 + 20] = cfg.image_token_index  # 20 placeholders, but one tile gives 16
    with pytest.raises(ValueError, match=r"20 <\|patch\|> tokens .* 16 features"):
        model(ids, pixel_values=torch.zeros(1, 3, 64, 64))


def test_text_only_model_rejects_pixels():
    model = Llama4(ModelConfig(text=small_text(), vision=None))
    with pytest.raises(ValueError, match="no vision tower"):
        model(torch.ones(1, 4, dtype=torch.long), pixel_values=torch.zeros(1, 3, 64, 64))


def test_wrong_tile_size_is_a_clear_error():
    model = Llama4(tiny())
    ids = torch.full((1, 20), model.config.image_token_index)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N_tiles, 3, 64, 64\]"):
        model(ids, pixel_values=torch.zeros(1, 3, 32, 32))


def test_tiny_trains_in_bf16():
    model = Llama4(tiny()).to(torch.bfloat16)
    ids = torch.randint(0, 7936, (2, 80))
    ids[0, 10:26] = model.config.image_token_index
    out = model(ids, pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.logits.float().logsumexp(-1).mean().backward()
    assert model.vision.patch_embedding.weight.grad is not None


def test_flex_attention_matches_dense_masks():
    """FlexAttention's block-sparse path follows the same visibility rule as the dense masks.
    (Forward only: PyTorch runs FlexAttention's backward on GPUs alone.)"""
    from herd.model.attention import use_flex_attention

    model = Llama4(ModelConfig(text=small_text(), vision=None)).eval()
    randomize_(model, std=0.1)
    ids = torch.randint(3, 128, (2, 40))
    docs = torch.tensor([[0] * 13 + [1] * 27, [0] * 40])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # the second row is left-padded
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, document_ids=docs).logits
        flex = use_flex_attention(model)(ids, attention_mask=mask, document_ids=docs).logits
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def test_inputs_embeds_give_the_same_logits_as_ids():
    model = Llama4(tiny()).eval()
    ids = torch.randint(0, 7936, (2, 50))
    ids[1, 3:19] = model.config.image_token_index
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        from_ids = model(ids, pixel_values=pixels, logits_to_keep=3).logits
        from_embeds = model(inputs_embeds=model.embed(ids, pixels), logits_to_keep=3).logits
    assert from_ids.shape == (2, 3, 8192)
    torch.testing.assert_close(from_embeds, from_ids)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(ids, inputs_embeds=model.embed(ids, pixels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_equals_plain_cross_entropy(dtype, monkeypatch):
    """`targets=` (the chunked head loss) gives the loss and the gradients of cross-entropy on
    whole logits, with ignored targets and chunks that do not divide the rows."""
    import torch.nn.functional as F

    from herd.model import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 5 * 128)  # 5 rows a chunk: 3 chunks, the last short
    monkeypatch.setattr(head_loss, "MIN_ROWS", 1)
    config = ModelConfig(text=small_text(), vision=None)
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        twins.append(Llama4(config).to(dtype))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 7), generator=g)
    targets = torch.randint(0, 128, (2, 7), generator=g)
    targets[0, :3] = head_loss.IGNORE
    plain = F.cross_entropy(twins[0](ids).logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    chunked = twins[1](ids, targets=targets).loss_sum
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked, plain, **tol)
    (2 * plain).backward()
    (2 * chunked).backward()  # the upstream gradient scales both kept gradients
    for (name, a), b in zip(twins[0].named_parameters(), twins[1].parameters()):
        torch.testing.assert_close(b.grad.float(), a.grad.float(), **tol, msg=name)
    with torch.no_grad():  # no gradients asked for: the loss alone
        torch.testing.assert_close(twins[1](ids, targets=targets).loss_sum, plain.detach(), **tol)
