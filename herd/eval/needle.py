"""Needle in a haystack (SPEC 7): can the model retrieve one fact from anywhere in a long context,
also beyond its training length?

A haystack is held-out code, line by line, filled to exactly `length` tokens. At a depth d (0 = the
first line, 1 = just before the question) one line is inserted: the needle `PASSKEY = 48213`; the
context ends with the question `assert PASSKEY == `. Two scores per trial:
- exact match: greedy generation continues with the value (what a capable model should do);
- likelihood: the value's log-probability after the context against that of `distractors` other
  numbers of the same number of digits; the trial scores its rank, and "top-1" if the true value
  ranks first. Chance is 1 / (distractors + 1). A tiny model that cannot yet produce five digits
  from memory still shows here whether the needle moved its belief, and from how far away.
Effective length: the longest tested context at which, and at every shorter one, the mean score over
depths reaches the threshold.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model import Llama4
from ..tokenizer import Tokenizer

NEEDLE = "PASSKEY = {value}\n"
QUESTION = "\nassert PASSKEY == "
DIGITS = 5


@dataclass(frozen=True)
class Haystack:
    context: list[int]  # begin-of-text, filler with the needle line inside, the question
    value: str
    needle_at: int  # index of the needle's first token in `context`


def filler_lines(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The texts' lines (newline kept), each encoded: haystacks are cut at line boundaries."""
    lines = [line for text in texts for line in text.splitlines(keepends=True) if line.strip()]
    if not lines:
        raise ValueError("the needle test needs filler text; the held-out texts have no non-empty line")
    return tokenizer.encode_batch(lines)


def build_haystack(tokenizer: Tokenizer, lines: list[list[int]], length: int, depth: float, value: str,
                   first_line: int = 0) -> Haystack:
    """A context of exactly `length` tokens with the needle at `depth` of the filler, which starts
    at line `first_line` (wrapping around the lines)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    needle, question = tokenizer.encode(NEEDLE.format(value=value)), tokenizer.encode(QUESTION)
    budget = length - 1 - len(needle) - len(question)
    if budget < 1:
        raise ValueError(f"a context of {length} tokens leaves no room for filler around the needle; use at least "
                         f"{len(needle) + len(question) + 2}")
    chosen, n, i = [], 0, first_line
    while n < budget:
        line = lines[i % len(lines)][: budget - n]
        chosen.append(line)
        n += len(line)
        i += 1
    ends = np.cumsum([len(line) for line in chosen])
    k = int(np.argmin(np.abs(np.concatenate([[0], ends]) - depth * budget)))  # lines before the needle
    before = [t for line in chosen[:k] for t in line]
    after = [t for line in chosen[k:] for t in line]
    context = [tokenizer.bos_id] + before + needle + after + question
    assert len(context) == length
    return Haystack(context, value, 1 + len(before))


@torch.no_grad()
def candidate_logprobs(model: Llama4, context: list[int], candidates: list[list[int]], pad_id: int) -> list[float]:
    """Summed log-probability of each candidate continuation after `context`, in one batch (rows
    right-padded: a causal model's earlier positions never see the padding)."""
    longest = max(map(len, candidates))
    rows = torch.full((len(candidates), len(context) + longest), pad_id, dtype=torch.long)
    rows[:, : len(context)] = torch.tensor(context)
    for i, cand in enumerate(candidates):
        rows[i, len(context): len(context) + len(cand)] = torch.tensor(cand)
    # logits[:, j] predicts the candidate's token j
    logits = model(rows.to(model.device), logits_to_keep=longest + 1).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).cpu()
    return [float(sum(logp[i, j, tok] for j, tok in enumerate(cand))) for i, cand in enumerate(candidates)]


def exact_match(completion: str, value: str) -> bool:
    return re.match(rf"\s*{re.escape(value)}(?!\d)", completion) is not None


@torch.no_grad()
def run_needle(model: Llama4, tokenizer: Tokenizer, lines: list[list[int]], lengths: Sequence[int],
               depths: Sequence[float], trials: int = 3, distractors: int = 4, seed: int = 0) -> dict:
    """Every (length, depth) cell, `trials` haystacks each: exact-match accuracy, top-1 accuracy of
    the likelihood variant and the mean rank of the true value (1 = first)."""
    from ..inference import generate

    rng = random.Random(seed)
    exact = np.zeros((len(depths), len(lengths)))
    top1 = np.zeros_like(exact)
    rank = np.zeros_like(exact)
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            for _ in range(trials):
                values = rng.sample(range(10 ** (DIGITS - 1), 10**DIGITS), distractors + 1)
                value = str(values[0])
                hay = build_haystack(tokenizer, lines, length, depth, value, rng.randrange(len(lines)))
                answer = tokenizer.encode(value)
                out = generate(model, torch.tensor([hay.context]), len(answer) + 1, temperature=0.0,
                               stop_token_ids=list(tokenizer.stop_ids))
                exact[i, j] += exact_match(tokenizer.decode(out[0, length:].tolist(), skip_special=True), value)
                scores = candidate_logprobs(model, hay.context, [tokenizer.encode(str(v)) for v in values],
                                            tokenizer.pad_id)
                r = 1 + sum(s > scores[0] for s in scores[1:])
                top1[i, j] += r == 1
                rank[i, j] += r
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "distractors": distractors,
            "chance_top1": 1 / (distractors + 1), "exact_match": (exact / trials).tolist(),
            "likelihood_top1": (top1 / trials).tolist(), "mean_rank": (rank / trials).tolist()}


def effective_length(lengths: Sequence[int], accuracy: np.ndarray, threshold: float) -> int:
    """The longest length L such that every tested length up to L has mean accuracy over depths
    (accuracy [depths, lengths]) of at least `threshold`; 0 if the shortest already falls short."""
    best = 0
    for length, score in sorted(zip(lengths, np.asarray(accuracy).mean(0))):
        if score < threshold:
            break
        best = length
    return best
