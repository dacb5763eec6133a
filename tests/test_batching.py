"""The continuous-batching engine against its slow twin, `generate` on each request alone: requests
arriving at different steps, rows freed and reused, prompts longer than the chunk (ring wrap) and
than the token budget (prefilled over several steps), an image request; seeded sampling independent
of the batch; stop tokens, limits, aborts, logprobs and input errors; quantized and compiled steps.

Near ties: on CPU in fp32 a request's logits in a batch equal its logits alone up to rounding (a
batched matmul may sum in another order), about 1e-6. Greedy tokens are compared exactly; where a
request's token differs from the solo run, the two runs met a near tie: the engine's pick must then
be within GAP of the best logit of the full forward over the shared prefix (no cache, the oracle
of tests/test_inference.py), and the rest of that request is not compared (its prefix differs).
"""

import pytest
import torch

from herd.inference import Engine, Request, SamplingParams, generate, prepare_for_decoding
from herd.inference import batching
from herd.quant import quantize_
from tests.hf_reference import image_prompt
from tests.test_inference import random_rows, tiny_model

GAP = 1e-4  # far above fp32 rounding of these logits (~1e-6), far below a real preference


def run(engine: Engine, arrivals: dict[int, list[Request]], max_steps: int = 400):
    """Steps the engine, adding each request at its step; returns tokens and outputs per request."""
    tokens, outputs, step = {}, {}, 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        assert step < max_steps, "the engine did not finish"
        for request in arrivals.get(step, []):
            engine.add(request)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    return tokens, outputs


def greedy(n, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=(), **kw)


@torch.no_grad()
def assert_twin(model, request: Request, got: list[int]):
    """`got` equals greedy `generate` on the request alone, up to a near tie (module docstring)."""
    prompt, n = request.prompt_ids, request.sampling.max_tokens
    want = generate(model, torch.tensor([prompt]), n, temperature=0.0, stop_token_ids=[],
                    pixel_values=request.pixel_values)[0, len(prompt):].tolist()
    assert len(got) == len(want) == n
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            logits = model(torch.tensor([prompt + got[:i]]), pixel_values=request.pixel_values).logits[0, -1]
            assert logits.max() - logits[g] < GAP, f"request {request.id} token {i}: {g} is no near-tie pick"
            return


def twin_requests(multimodal: bool):
    lengths = [5, 21, 3, 12, 30, 7]  # 21, 30 > chunk 8 (ring wrap) and > the prefill budget
    rows = random_rows(lengths, seed=3)
    requests = [Request(f"r{i}", row, greedy(n)) for i, (row, n) in enumerate(zip(rows, [9, 6, 14, 4, 8, 11]))]
    if multimodal:
        ids = image_prompt([2], tokens_per_tile=4, text_len=3, seed=0)[0].tolist()
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        requests.append(Request("image", ids, greedy(7), pixels))
    return requests


def check_twin(multimodal: bool, max_batch: int, budget: int):
    model = tiny_model(multimodal=multimodal, chunk=8, floor_scale=4)
    requests = twin_requests(multimodal)
    # Arrivals at different steps; more requests than rows, so rows are freed and reused.
    arrivals = {0: requests[:2], 1: requests[2:3], 4: requests[3:5], 9: requests[5:]}
    engine = Engine(model, max_batch=max_batch, token_budget=budget)
    tokens, outputs = run(engine, arrivals)
    for request in requests:
        assert outputs[request.id][-1].finish_reason == "length"
        assert_twin(model, request, tokens[request.id])
    assert engine.num_running == engine.num_waiting == 0


@pytest.mark.parametrize("max_batch, budget", [(3, 8), (4, 64), (8, 512)])
def test_engine_equals_each_request_alone(max_batch, budget):
    """The slow twin, an image request included, at several batch sizes and budgets (a few seconds each)."""
    check_twin(multimodal=True, max_batch=max_batch, budget=budget)


def test_image_request_in_a_batch():
    """Tiles are encoded at admission and fed to the prompt's pieces (here 3 pieces)."""
    model = tiny_model(multimodal=True, chunk=8, floor_scale=4)
    requests = twin_requests(multimodal=True)
    image, other = requests[-1], requests[1]
    tokens, _ = run(Engine(model, max_batch=2, token_budget=6), {0: [other], 2: [image]})
    assert_twin(model, image, tokens["image"])
    assert_twin(model, other, tokens[other.id])


def test_budget_bounds_prefill_while_others_decode():
    """A long prompt arriving while another request decodes is prefilled over several steps, and the
    decoding request gets a token at every one of them."""
    model = tiny_model(chunk=8)
    short, long = random_rows([4, 40], seed=1)
    engine = Engine(model, max_batch=2, token_budget=9)
    engine.add(Request("short", short, greedy(12)))
    assert [o.token_ids for o in engine.step()] and engine.num_running == 1  # prefilled, first token
    engine.add(Request("long", long, greedy(3)))
    steps = []
    while engine.has_unfinished():
        steps.append({o.request_id: o for o in engine.step()})
    first_long = next(i for i, s in enumerate(steps) if "long" in s)
    assert first_long == 4  # 40 prompt tokens at 8 a step (9 minus one decoding row): 5 steps
    assert all(len(s["short"].token_ids) == 1 for s in steps[:first_long + 1])


def test_seeded_sampling_ignores_the_rest_of_the_batch():
    model = tiny_model(chunk=8)
    prompt, *others = random_rows([6, 9, 4, 13], seed=4)

    def sampled(seed, company, same_options=False):
        request = Request("x", prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                                                      stop_token_ids=()))
        top_p = 0.9 if same_options else 1.0
        rest = [Request(f"o{i}", p, SamplingParams(max_tokens=10, temperature=1.0, top_p=top_p, stop_token_ids=()))
                for i, p in enumerate(company)]
        arrivals = {0: rest[:1] + [request], 2: rest[1:]} if rest else {0: [request]}
        return run(Engine(model, max_batch=3, token_budget=16), arrivals)[0]["x"]

    alone = sampled(7, [])
    assert sampled(7, others) == alone
    assert sampled(7, others, same_options=True) == alone  # sampled in one call with the others
    assert sampled(7, others[::-1]) == alone
    assert sampled(8, others) != alone
    assert sampled(-3, []) == sampled(-3 + 2**64, others)  # any integer seed, taken modulo 2**64


def test_stop_tokens_limits_and_abort():
    model = tiny_model(chunk=8)
    rows = random_rows([5, 6, 7, 8], seed=5)
    free = generate(model, torch.tensor([rows[0]]), 10, temperature=0.0, stop_token_ids=[])[0, 5:].tolist()
    stop = free[3]
    engine = Engine(model, max_batch=2, token_budget=32)
    engine.add(Request("stop", rows[0], SamplingParams(max_tokens=10, stop_token_ids=(stop,))))
    engine.add(Request("abort", rows[1], greedy(50)))
    engine.add(Request("waiting", rows[2], greedy(5)))
    engine.add(Request("zero", rows[3], greedy(0, prompt_logprobs=True)))
    assert engine.num_waiting == 4
    tokens, outputs = {}, {}
    for i in range(30):
        if i == 1:
            assert (engine.num_running, engine.num_waiting) == (2, 2)
            engine.abort("waiting")
        if i == 3:
            engine.abort("abort")
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            outputs[out.request_id] = out
    assert not engine.has_unfinished()
    assert tokens["stop"] == free[:free.index(stop) + 1] and outputs["stop"].finish_reason == "stop"
    assert outputs["abort"].finish_reason == "abort" and len(tokens["abort"]) == 3
    assert outputs["waiting"].finish_reason == "abort" and tokens["waiting"] == []
    assert outputs["zero"].finish_reason == "length" and tokens["zero"] == [] and outputs["zero"].prompt_tokens == 8
    with pytest.raises(ValueError, match="already"):
        engine.add(Request("x", rows[0], greedy(2)))
        engine.add(Request("x", rows[0], greedy(2)))


@torch.no_grad()
def test_logprobs_and_prompt_logprobs_match_the_full_forward():
    model = tiny_model(chunk=8)
    prompt = random_rows([11], seed=6)[0]
    engine = Engine(model, max_batch=2, token_budget=6)  # the prompt in pieces of 6 and 5
    engine.add(Request("a", prompt, greedy(4, logprobs=3, prompt_logprobs=True)))
    tokens, outputs = run(engine, {})
    first = outputs["a"][0]
    assert all(o.prompt_logprobs is None for o in outputs["a"][1:])  # set once, on the first output
    ids = torch.tensor([prompt + tokens["a"]])
    lp = model(ids).logits[0].float().log_softmax(-1)  # [T + 4, V]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(prompt)
    want = lp[torch.arange(len(prompt) - 1), ids[0, 1:len(prompt)]]
    entries = first.prompt_logprobs[1:]
    assert [e.token_id for e in entries] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), want, rtol=1e-4, atol=1e-4)
    best = lp[:len(prompt) - 1].max(-1)  # each prompt position's most likely token
    assert [e.top[0][0] for e in entries] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor([e.top[0][1] for e in entries]), best.values, rtol=1e-4, atol=1e-4)
    for i, out in enumerate(outputs["a"]):
        (entry,) = out.logprobs
        row = lp[len(prompt) - 1 + i]
        assert entry.token_id == tokens["a"][i] and abs(entry.logprob - float(row[entry.token_id])) < 1e-4
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the best


def test_bad_requests_are_explained():
    model = tiny_model(chunk=8)
    engine = Engine(model, max_batch=2, max_seq_len=64, token_budget=8)
    cases = [
        (Request("a", [], greedy(2)), "non-empty"),
        (Request("a", [5, 999999], greedy(2)), "token ids"),
        (Request("a", [5] * 60, greedy(10)), "max_seq_len"),
        (Request("a", [5] * 500, greedy(20)), "max_position_embeddings"),
        (Request("a", [5, 6], SamplingParams(temperature=-1.0)), "temperature"),
        (Request("a", [5, 6], SamplingParams(max_tokens=-1)), "max_tokens"),
        (Request("a", [5, 6], greedy(2), torch.zeros(1, 3, 32, 32)), "vision tower"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add(request)
    image_engine = Engine(tiny_model(multimodal=True), max_batch=1, token_budget=8)
    with pytest.raises(ValueError, match="patch"):
        image_engine.add(Request("a", [5, 6], greedy(2), torch.zeros(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="tiles"):
        image_engine.add(Request("a", [5, 6], greedy(2), torch.zeros(1, 3, 30, 32)))
    with pytest.raises(ValueError, match="token_budget"):
        Engine(model, max_batch=8, token_budget=8)
    assert not engine.has_unfinished()


@pytest.mark.isa
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_equals_each_request_alone(method):
    model = prepare_for_decoding(quantize_(tiny_model(chunk=8, moe_step=2, top_k=2), method))
    requests = twin_requests(multimodal=False)[:4]
    tokens, _ = run(Engine(model, max_batch=2, token_budget=10), {0: requests[:2], 3: requests[2:]})
    for request in requests:
        assert_twin(model, request, tokens[request.id])


def test_compile_path_quick(monkeypatch):
    """The compiled engine's step (batch rounded up to a power of two, every global slot attended,
    write positions as tensors) run eagerly: the same tokens as the eager engine."""
    from herd.inference import compiled

    model = prepare_for_decoding(tiny_model(chunk=8, moe_step=2, top_k=2))
    calls = []

    def eager_step(model, cache, tokens, positions, documents):
        calls.append(tokens.shape[0])
        return compiled._step(model, cache, tokens, positions, documents)

    monkeypatch.setattr(batching, "compiled_step", eager_step)
    requests = twin_requests(multimodal=False)[:5]
    arrivals = {0: requests[:2], 2: requests[2:]}
    want = run(Engine(model, max_batch=3, token_budget=16), arrivals)[0]
    got = run(Engine(model, max_batch=3, token_budget=16, compile=True), arrivals)[0]
    assert got == want and set(calls) <= {1, 2, 3} and 2 in calls


@pytest.mark.slow
@pytest.mark.isa
def test_compiled_engine_equals_eager():
    """Compiled (minutes on 2 shared cores: graphs for batches 1 and 2, full precision and int4)."""
    model = prepare_for_decoding(tiny_model(chunk=8, moe_step=2, top_k=2))
    int4 = prepare_for_decoding(quantize_(tiny_model(chunk=8, moe_step=2, top_k=2), "int4"))
    requests = twin_requests(multimodal=False)[:4]
    arrivals = {0: requests[:2], 3: requests[2:]}
    for m in (model, int4):
        want = run(Engine(m, max_batch=2, token_budget=16), arrivals)[0]
        assert run(Engine(m, max_batch=2, token_budget=16, compile=True), arrivals)[0] == want
