"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

A sampled token is drawn by inverting the cumulative distribution with one uniform number per row
(`token = first index whose cumulative probability exceeds u`), the uniforms drawn from each row's
own generator. That keeps a seeded row's tokens independent of the rows batched with it, while the
softmax, filtering and search run once for the whole batch: torch.multinomial, row by row with its
generator, cost ten times more a token on a CPU and was a quarter of the time of RL's rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_sampling(temperature: float, top_p: float, top_k: int | None):
    """Raises ValueError naming the first bad option."""
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (no limit), got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], every row with the same options; the rows' uniforms
    come from `generator` in row order. temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return _inverse_cdf(_filtered_probs(logits, temperature, top_p, top_k), uniforms)


def sample_rows(logits: torch.Tensor, options: Sequence[tuple[float, float, int | None]],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] where row i has its own (temperature, top_p, top_k) and
    its own generator (None: torch's global one). Rows with equal options are sampled together."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, option in enumerate(options):
        groups.setdefault(tuple(option), []).append(i)
    for (temperature, top_p, top_k), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        if temperature == 0.0:
            tokens[index] = logits[index].argmax(-1)
            continue
        uniforms = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in rows])
        tokens[index] = _inverse_cdf(_filtered_probs(logits[index], temperature, top_p, top_k), uniforms)
    return tokens


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> torch.Tensor:
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p: a token is
        # dropped when the tokens ranked above it already reach it (so the first is always kept).
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first whose cumulative probability exceeds t = uniforms[i] x the row's
    total, t kept below the total. The cumulative sum steps past t at that token, so its probability
    is positive: a filtered-out token is never chosen, not even for u = 0 or after rounding."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    targets = torch.minimum(uniforms.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, right=True)[:, 0]
