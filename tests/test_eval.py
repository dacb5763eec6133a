"""herd/eval: perplexity, NLL by position and its fit, needle in a haystack, speed, tasks, and the
`herd eval` command, on a tiny random checkpoint with its own tokenizer."""

import json
import math
import re
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd.cli import main
from herd.config import ModelConfig, TextConfig
from herd.data.corpora import stdlib_texts
from herd.eval import needle as needle_mod
from herd.eval.needle import (build_haystack, candidate_logprobs, effective_length, exact_match, filler_lines,
                              run_needle)
from herd.eval.perplexity import score_texts, token_nlls
from herd.eval.position import cumulative_average, fit_power_law, nll_by_position, segment_means
from herd.eval.speed import measure_speed
from herd.eval.tasks import held_out, pass_at_k, score_tasks
from herd.hf import from_pretrained, save_pretrained
from herd.model import Llama4
from herd.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/x/model (a text-only checkpoint with tokenizer) beside runs/x/config.json (seq_len 64)."""
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=30_000)], num_bpe_ranks=300)
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_local_experts=2, attention_chunk_size=16, floor_scale=16, max_position_embeddings=1024,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_pretrained(Llama4(ModelConfig(text=text, vision=None)), run / "model")
    tok.save(run / "model")
    (run / "config.json").write_text(json.dumps({"train": {"seq_len": 64}}))
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return from_pretrained(run_dir / "model")


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return Tokenizer.from_dir(run_dir / "model")


# ---- perplexity

def test_token_nlls_predicts_each_token_once_with_its_window_context(model):
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = token_nlls(model, ids, 64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    assert torch.allclose(whole, F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double(), atol=1e-5)
    # windows of 8 tokens score 7 targets each; the last piece (token 22 alone) gets a full window
    windowed = token_nlls(model, ids, 8)
    assert windowed.shape == (22,)
    for i in range(1, len(ids)):
        first = 1 + 7 * ((i - 1) // 7)
        start = max(0, min(first + 7, len(ids)) - 8)  # 0, 7, 14, then 15 for the last piece
        with torch.no_grad():
            last = model(torch.tensor([ids[start:i]])).logits[0, -1]
        assert math.isclose(windowed[i - 1], F.cross_entropy(last[None], torch.tensor([ids[i]])).item(), abs_tol=1e-4)
    assert not torch.allclose(windowed, whole)  # the cut context changes later tokens' NLL
    with pytest.raises(ValueError, match="window"):
        token_nlls(model, ids, 1)


def test_score_texts_bits_per_byte_and_perplexity(model, tokenizer):
    texts = ["def f(x):\n    return x + 1\n", "é = 'ünïcode'\n"]
    score = score_texts(model, lambda s: tokenizer.encode(s, bos=True), texts, 16).to_dict()
    nll = sum(float(token_nlls(model, tokenizer.encode(t, bos=True), 16).sum()) for t in texts)
    assert score["tokens"] == sum(len(tokenizer.encode(t)) for t in texts)  # every text token, not the bos
    assert score["bytes"] == sum(len(t.encode()) for t in texts) > sum(map(len, texts))
    assert math.isclose(score["bpb"], nll / math.log(2) / score["bytes"])
    assert math.isclose(score["perplexity"], math.exp(nll / score["tokens"]))


# ---- NLL by position

def test_nll_by_position_is_the_mean_over_documents(model):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (40, 50, 10)]
    nll = nll_by_position(model, docs, 40)
    expected = (token_nlls(model, docs[0][:40], 40) + token_nlls(model, docs[1][:40], 40)) / 2  # the short one is out
    assert np.allclose(nll, expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no held-out document has 60 tokens"):
        nll_by_position(model, docs, 60)


def test_power_law_fit_recovers_known_parameters():
    t = np.arange(1, 2001, dtype=float)
    y = 1.3 + 2.5 * t**-0.4
    fit = fit_power_law(y)
    assert abs(fit["a"] - 1.3) < 1e-3 and abs(fit["b"] - 2.5) < 1e-3 and abs(fit["c"] - 0.4) < 1e-3
    assert fit["r2"] > 0.999999 and not fit["c_at_bound"]
    noisy = y + np.random.default_rng(0).normal(0, 0.05, len(y))
    fit = fit_power_law(noisy)
    assert abs(fit["c"] - 0.4) < 0.1 and 0.5 < fit["r2"] < 1
    rising = fit_power_law(1.0 + 0.001 * t)
    assert rising["r2"] < 0.99 and rising["c_at_bound"]  # a rising line is no falling power law
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law(y[:3])


def test_cumulative_average_and_segments():
    nll = np.array([4.0, 2.0, 3.0, 1.0])
    assert np.allclose(cumulative_average(nll), [4, 3, 3, 2.5])
    assert segment_means(nll, [2, 0, 9]) == [{"from": 1, "to": 2, "mean_nll": 3.0},
                                             {"from": 3, "to": 4, "mean_nll": 2.0}]


# ---- needle in a haystack

def test_haystack_has_the_exact_length_and_the_needle_at_its_depth(tokenizer):
    lines = filler_lines(tokenizer, [d.text for d in stdlib_texts("validation", max_files=5)])
    for depth in (0.0, 0.5, 1.0):
        hay = build_haystack(tokenizer, lines, 200, depth, "48213", first_line=3)
        assert len(hay.context) == 200 and hay.context[0] == tokenizer.bos_id
        text = tokenizer.decode(hay.context[1:])
        assert text.count("PASSKEY = 48213\n") == 1 and text.endswith("\nassert PASSKEY == ")
        needle = tokenizer.encode("PASSKEY = 48213\n")
        assert hay.context[hay.needle_at: hay.needle_at + len(needle)] == needle
        filler = 200 - 1 - len(needle) - len(tokenizer.encode("\nassert PASSKEY == "))
        assert abs((hay.needle_at - 1) - depth * filler) <= max(map(len, lines))  # at a line boundary near the depth
    with pytest.raises(ValueError, match="depth"):
        build_haystack(tokenizer, lines, 200, 1.5, "1")
    with pytest.raises(ValueError, match="no room"):
        build_haystack(tokenizer, lines, 8, 0.5, "48213")


def test_candidate_logprobs_match_one_forward_per_candidate(model):
    context = list(range(5, 40))
    candidates = [[7, 8], [9], [10, 11, 12]]
    got = candidate_logprobs(model, context, candidates, pad_id=0)
    for cand, score in zip(candidates, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + cand])).logits[0].float(), -1)
        expected = sum(logp[len(context) - 1 + j, tok].item() for j, tok in enumerate(cand))
        assert math.isclose(score, expected, abs_tol=1e-4)


def test_exact_match_and_effective_length():
    assert exact_match(" 48213\n", "48213") and exact_match("48213", "48213")
    assert not exact_match(" 482130", "48213") and not exact_match("x48213", "48213")
    acc = np.array([[1.0, 0.5, 1.0, 0.0], [1.0, 0.5, 0.0, 1.0]])  # [depths, lengths]; means 1, .5, .5, .5
    assert effective_length([64, 128, 256, 512], acc, 0.5) == 512
    assert effective_length([64, 128, 256, 512], acc, 0.6) == 64
    assert effective_length([64, 128], np.zeros((2, 2)), 0.5) == 0


def _value_in(tokenizer, context):
    return re.search(r"PASSKEY = (\d+)", tokenizer.decode(context)).group(1)


def test_needle_grid_scores_a_model_that_reads_the_needle(model, tokenizer, monkeypatch):
    """Stand-ins for the model that find the value in the context (an oracle) or do not (blind):
    the grid must give the oracle every cell and the blind scorer about chance."""
    import herd.inference

    lines = filler_lines(tokenizer, [d.text for d in stdlib_texts("validation", max_files=5)])

    def oracle_generate(model, ids, new, **kw):
        value = tokenizer.encode(_value_in(tokenizer, ids[0].tolist()))
        return torch.cat([ids, torch.tensor([value])], 1)

    def oracle_scores(model, context, candidates, pad_id):
        value = tokenizer.encode(_value_in(tokenizer, context))
        return [0.0 if c == value else -1.0 for c in candidates]

    monkeypatch.setattr(herd.inference, "generate", oracle_generate)
    monkeypatch.setattr(needle_mod, "candidate_logprobs", oracle_scores)
    r = run_needle(model, tokenizer, lines, [64, 128], [0.0, 1.0], trials=2, distractors=3)
    assert r["exact_match"] == r["likelihood_top1"] == [[1.0, 1.0], [1.0, 1.0]]
    assert r["mean_rank"] == [[1.0, 1.0], [1.0, 1.0]] and r["chance_top1"] == 0.25

    rng = np.random.default_rng(0)
    monkeypatch.setattr(needle_mod, "candidate_logprobs", lambda m, c, cands, p: rng.normal(size=len(cands)).tolist())
    r = run_needle(model, tokenizer, lines, [64], [0.0, 0.5, 1.0], trials=20, distractors=3)
    assert 0.05 < np.mean(r["likelihood_top1"]) < 0.5
    assert 2.0 < np.mean(r["mean_rank"]) < 3.0  # chance: 2.5 of 4


def test_needle_grid_on_a_real_model(model, tokenizer):
    lines = filler_lines(tokenizer, [d.text for d in stdlib_texts("validation", max_files=5)])
    r = run_needle(model, tokenizer, lines, [48, 96], [0.0, 1.0], trials=1, distractors=2)
    assert np.array(r["exact_match"]).shape == (2, 2)
    assert all(1 <= x <= 3 for row in r["mean_rank"] for x in row)


# ---- speed and tasks

def test_speed_reports_positive_rates(model):
    s = measure_speed(model, prompt_tokens=32, new_tokens=4, repeats=1)
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0 and s["new_tokens"] == 4
    with pytest.raises(ValueError, match="context"):
        measure_speed(model, prompt_tokens=1020, new_tokens=8)


def test_pass_at_k_is_the_chance_that_k_of_n_samples_include_a_pass():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 1, 6), (4, 0, 2), (4, 4, 1)]:
        draws = list(combinations([True] * c + [False] * (n - c), k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


class _Task:
    def __init__(self, prompt, check, kind="toy"):
        self.prompt, self.check, self.kind = prompt, check, kind


def test_score_tasks_counts_checked_samples(model, tokenizer):
    seen = []
    tasks = [_Task("def f(x):", lambda c: True), _Task("x = ", lambda c: False),
             _Task([{"role": "user", "content": "hi"}], lambda c: seen.append(c) or len(seen) % 2 == 1, kind="chat")]
    r = score_tasks(model, tokenizer, tasks, samples=4, ks=(1, 2), max_new_tokens=3)
    assert r["toy"]["tasks"] == 2 and math.isclose(r["toy"]["pass@1"], 0.5) and math.isclose(r["toy"]["pass@2"], 0.5)
    # the chat task's checker is called once per sample and passes 2 of the 4
    assert math.isclose(r["chat"]["pass@1"], 0.5) and math.isclose(r["chat"]["pass@2"], 1 - 1 / 6)
    assert len(seen) == 4 and all(isinstance(c, str) for c in seen)
    with pytest.raises(ValueError, match="k <= samples"):
        score_tasks(model, tokenizer, tasks, samples=2, ks=(1, 4))


def test_held_out_problems_are_checked_by_their_tasks():
    from herd.tasks import get_task
    from herd.tasks.base import in_split

    problems, skipped = held_out(["letters", "arithmetic", "scenes", "clips"], 3, vision=False)
    assert set(skipped) == {"scenes", "clips"} and [h.kind for h in problems] == ["letters"] * 3 + ["arithmetic"] * 3
    for h in problems:
        assert in_split(h.problem.key, "test", get_task(h.kind).test_fraction)  # never a training problem
        assert h.prompt == h.problem.messages()
        assert h.check(h.problem.worked) and not h.check("Answer: -12345") and not h.check("no answer line")
    shown, skipped = held_out(["scenes", "clips"], 2, vision=True)
    assert not skipped and [h.kind for h in shown] == ["scenes"] * 2 + ["clips"] * 2
    assert [[part["type"] for part in h.prompt[0]["content"]] for h in shown] == [
        ["image", "text"], ["image", "text"], ["video", "text"], ["image", "image", "text"]]  # clips: levels in turn


def test_score_tasks_on_held_out_problems_with_an_oracle(model, tokenizer, monkeypatch):
    """An oracle in place of sampling (it answers the problem whose chat it is given) passes every
    held-out problem; the checkers and the bookkeeping are herd's own."""
    import herd.inference

    problems, _ = held_out(["letters", "arithmetic"], 2, vision=False)
    prompts = {tuple(tokenizer.encode(h.prompt[0]["content"])): h.problem for h in problems}

    def oracle(model, ids, new, **kw):
        row = ids[0].tolist()
        problem = next(p for key, p in prompts.items() if any(row[i:i + len(key)] == list(key) for i in range(len(row))))
        answer = torch.tensor([tokenizer.encode(f"Answer: {problem.answer}") + [tokenizer.eot_id]] * len(ids))
        return torch.cat([ids, answer], 1)

    monkeypatch.setattr(herd.inference, "generate", oracle)
    r = score_tasks(model, tokenizer, problems, samples=2, ks=(1, 2))
    assert {k: v["pass@1"] for k, v in r.items()} == {"letters": 1.0, "arithmetic": 1.0}


# ---- the command

def test_herd_eval_writes_report_results_and_figures(run_dir, tmp_path, capsys):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "a.txt").write_text("hello world, this is my own text.\n" * 20)
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir / "model"), "--quick", "--out", str(out), "--data", str(data),
                 "--needle-lengths", "48,64,128", "--nll-len", "160"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["train_len"] == 64 and r["train_len_source"].endswith("config.json")
    assert set(r["perplexity"]["rows"]) == {"held-out stdlib code", f"your data ({data})"}
    assert r["perplexity"]["window"] == 64
    assert r["position"]["length"] == 160 and len(r["position"]["nll"]) == 159 and 0 <= r["position"]["fit"]["r2"] <= 1
    assert r["needle"]["lengths"] == [48, 64, 128] and np.array(r["needle"]["exact_match"]).shape == (3, 3)
    assert r["speed"]["decode_tokens_per_s"] > 0
    assert set(r["tasks"]["kinds"]) == {"letters", "arithmetic"} and set(r["tasks"]["skipped"]) == {"scenes", "clips"}
    assert all(k["tasks"] == 4 and k["samples"] == 2 and 0 <= k["pass@1"] <= k["pass@2"] <= 1
               for k in r["tasks"]["kinds"].values())
    report = (out / "report.md").read_text()
    for heading in ("Perplexity", "NLL by position", "Needle in a haystack", "Verifiable tasks", "Speed", "R² =",
                    "Not scored: scenes"):
        assert heading in report
    assert (out / "nll_by_position.png").stat().st_size > 1000 and (out / "needle.png").stat().st_size > 1000
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", str(run_dir / "model"), "--sections", "perplexity,typo", "--out", str(out)]) == 2
    assert "typo" in capsys.readouterr().err


def test_transformers_baseline_gives_the_same_numbers(run_dir, tmp_path):
    """The same checkpoint through transformers (the oracle) and through herd: the same perplexity
    and the same NLL by position, so baselines and herd models are measured alike."""
    pytest.importorskip("transformers")
    common = ["--sections", "perplexity,position", "--text-bytes", "6000", "--nll-len", "100", "--nll-files", "2"]
    assert main(["eval", str(run_dir / "model"), "--out", str(tmp_path / "herd")] + common) == 0
    assert main(["eval", str(run_dir / "model"), "--transformers", "--out", str(tmp_path / "hf")] + common) == 0
    ours, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("herd", "hf"))
    assert theirs["kind"] == "transformers"
    row = "held-out stdlib code"
    assert ours["perplexity"]["rows"][row]["tokens"] == theirs["perplexity"]["rows"][row]["tokens"]
    assert math.isclose(ours["perplexity"]["rows"][row]["bpb"], theirs["perplexity"]["rows"][row]["bpb"], rel_tol=1e-4)
    assert np.allclose(ours["position"]["nll"], theirs["position"]["nll"], atol=1e-3)
