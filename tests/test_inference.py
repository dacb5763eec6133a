"""Generation: cached decoding against the full forward (the slow twin), greedy parity with
`transformers`' generate, the bounded cache, sampling options and input errors."""

import pytest
import torch

from herd.config import from_hf_dict
from herd.inference import StaticKVCache, generate, generate_stream, pad_prompts, sample
from herd.model import Llama4
from tests.hf_reference import IMAGE_TOKEN, build_hf_model, hf_config_dict, image_prompt, randomize_


def tiny_model(multimodal=False, seed=0, **overrides) -> Llama4:
    model = Llama4(from_hf_dict(hf_config_dict(multimodal=multimodal, **overrides))).eval()
    randomize_(model, seed=seed)
    return model


def random_rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 240, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def cached_logits(model, ids, mask, pixels, continuation, prefill_chunk):
    """Logits of every continuation token, computed through the cache: each row's prompt (padding
    dropped) prefilled in pieces into its own row, then one decode step per token for all rows
    together, each row at its own length."""
    B = ids.shape[0]
    cache = StaticKVCache(model.config.text, B, ids.shape[1] + continuation.shape[1], dtype=model.dtype)
    embeds = model.embed(ids, pixels)  # [B, T, D], image features in place
    first = []
    for b in range(B):
        h = embeds[b, mask[b].bool()]
        for a in range(0, h.shape[0], prefill_chunk):
            piece = cache.piece(b, min(prefill_chunk, h.shape[0] - a))
            logits = model(inputs_embeds=h[None, a:a + prefill_chunk], layout=piece.layout, cache=piece,
                           logits_to_keep=1).logits[0, -1]
        first.append(logits)
    out = [torch.stack(first)]
    for i in range(continuation.shape[1]):
        positions = torch.tensor(cache.lengths)
        step = cache.step(positions, torch.zeros_like(positions), end=int(positions.max()) + 1)
        out.append(model(continuation[:, i:i + 1], layout=step.layout, cache=step, logits_to_keep=1).logits[:, -1])
        cache.lengths = [n + 1 for n in cache.lengths]
    return torch.stack(out, 1).float()  # [B, new + 1, V]


@pytest.mark.parametrize("chunk", [3, 8, 64])
@pytest.mark.parametrize("images", [False, True])
def test_cached_decoding_equals_full_forward(chunk, images):
    """Prefill in pieces (that straddle chunks), then decode past several chunk boundaries and past
    floor_scale, on a left-padded batch: every step's logits equal one forward over all tokens."""
    model = tiny_model(multimodal=images, chunk=chunk, floor_scale=4)
    pixels = None
    if images:
        rows = [image_prompt([2], tokens_per_tile=4, text_len=3, seed=0)[0].tolist(),
                image_prompt([1], tokens_per_tile=4, text_len=2, seed=1)[0].tolist()]
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:
        rows = random_rows([17, 9, 1])
    ids, mask = pad_prompts(rows, pad_id=0)
    continuation = torch.randint(3, 240, (ids.shape[0], 20), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, continuation], 1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], 1)
    with torch.no_grad():
        expected = model(full_ids, pixel_values=pixels, attention_mask=full_mask).logits[:, ids.shape[1] - 1:]
    got = cached_logits(model, ids, mask, pixels, continuation, prefill_chunk=5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ring_cache_is_bounded():
    model = tiny_model(chunk=8)  # layers 0, 2 RoPE (chunked), 1, 3 NoPE
    cache = StaticKVCache(model.config.text, batch=2, max_tokens=100)
    assert [k.shape[1] for k in cache.k] == [8, 100, 8, 100]
    assert cache.nbytes() == (8 + 100) * 2 * (2 * 2 * 2 * 16 * 4)
    assert cache.unbounded_nbytes() == 4 * 100 * 2 * (2 * 2 * 16 * 4)


@pytest.mark.parametrize("chunk", [8, 64])
def test_greedy_matches_transformers_generate(chunk):
    """Greedy continuations equal `transformers`' greedy generate with its own cache, across chunk
    boundaries and past floor_scale (temperature tuning active), row by row."""
    hf = build_hf_model(hf_config_dict(multimodal=False, chunk=chunk, floor_scale=4))
    model = tiny_model(chunk=chunk, floor_scale=4)
    model.load_state_dict(_hf_to_herd_state(hf))
    for row in random_rows([11, 5], seed=3):
        ids = torch.tensor([row])
        with torch.no_grad():
            theirs = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = generate(model, ids, 30, temperature=0.0, stop_token_ids=[])
        assert torch.equal(ours, theirs)


def _hf_to_herd_state(hf) -> dict:
    from herd.hf import from_hf_key

    return {from_hf_key(k, multimodal=False): v for k, v in hf.state_dict().items()}


def test_batched_greedy_equals_each_row_alone():
    model = tiny_model(chunk=8, floor_scale=4)
    rows = random_rows([13, 4, 9], seed=5)
    ids, mask = pad_prompts(rows, pad_id=0)
    batched = generate(model, ids, 25, temperature=0.0, attention_mask=mask, stop_token_ids=[])
    for i, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), 25, temperature=0.0, stop_token_ids=[])
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(row):])


def test_rows_that_stop_are_padded_and_stream_matches():
    model = tiny_model()
    rows = random_rows([6, 6, 6], seed=7)
    ids = torch.tensor(rows)
    free = generate(model, ids, 12, temperature=0.0, stop_token_ids=[])
    stop = int(free[0, 6 + 3])  # row 0's fourth new token becomes a stop token
    out = generate(model, ids, 12, temperature=0.0, stop_token_ids=[stop])
    assert out[0, 6 + 3] == stop and (out[0, 6 + 4:] == model.config.text.pad_token_id).all()
    for i in range(3):  # each row runs until its first stop token, then pads
        new = free[i, 6:out.shape[1]].tolist()
        cut = new.index(stop) + 1 if stop in new else len(new)
        assert out[i, 6:6 + cut].tolist() == new[:cut]
    streamed = torch.stack(list(generate_stream(model, ids, 12, temperature=0.0, stop_token_ids=[stop])), 1)
    assert torch.equal(streamed, out[:, 6:])


def test_sampling_is_seeded_and_filtered():
    model = tiny_model()
    ids = torch.tensor(random_rows([5, 5], seed=2))
    a = generate(model, ids, 10, temperature=1.0, top_p=0.95, seed=11, stop_token_ids=[])
    b = generate(model, ids, 10, temperature=1.0, top_p=0.95, seed=11, stop_token_ids=[])
    c = generate(model, ids, 10, temperature=1.0, top_p=0.95, seed=12, stop_token_ids=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, 10, temperature=0.0, stop_token_ids=[])
    assert torch.equal(generate(model, ids, 10, temperature=1.0, top_k=1, seed=1, stop_token_ids=[]), greedy)
    assert torch.equal(generate(model, ids, 10, temperature=1.0, top_p=1e-6, seed=1, stop_token_ids=[]), greedy)


def test_sample_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p 0.7: tokens 0 and 1 reach it (0.8), so token 2 and 3 never appear
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}


def test_sampled_tokens_follow_the_distribution_and_never_a_filtered_one():
    from herd.inference.sampling import _inverse_cdf, sample_rows

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(probs.log().expand(40_000, 4), 1.0, generator=g), minlength=4)
    torch.testing.assert_close(counts / 40_000, probs, atol=0.01, rtol=0)
    # the extreme uniforms land on the first and last tokens of positive probability
    edges = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 3)
    assert _inverse_cdf(edges, torch.tensor([0.0, 0.5, 1 - 1e-9])).tolist() == [1, 2, 2]
    # rows with their own options and generators: greedy rows are the argmax, a seeded row is its generator's
    logits = torch.randn(4, 50)
    tokens = sample_rows(logits, [(0.0, 1.0, None), (1.0, 1.0, 1), (0.7, 0.9, None), (0.7, 0.9, None)],
                         [None, None, torch.Generator().manual_seed(3), None])
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()  # top_k=1 is greedy
    assert tokens[2] == sample(logits[2:3], 0.7, 0.9, generator=torch.Generator().manual_seed(3))[0]


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_new_tokens=600), "max_new_tokens"),
    (dict(pixel_values=torch.zeros(1, 3, 32, 32)), "pixel_values"),
])
def test_bad_options_name_the_parameter(kwargs, name):
    model = tiny_model()
    kwargs = {"max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=name):
        generate_stream(model, torch.tensor([[5, 6, 7]]), **kwargs)  # raised before the first token


def test_bad_prompts_are_explained():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.full((1, 513), 5), 1)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.tensor([[5, 6, 0]]), 1, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="patch"):  # image tokens without the right number of tiles
        generate(tiny_model(multimodal=True), torch.tensor([[5, IMAGE_TOKEN, 6]]), 1,
                 pixel_values=torch.zeros(1, 3, 32, 32))
