"""The seeds' long-context figure (SPEC 7): cumulative average NLL by token position on long
held-out code files, with a power-law fit.

For each position t, the mean NLL of the token at t over documents at least `length` tokens long;
the cumulative average of that curve (mean over positions 1..t) should fall with t and flatten. Past
the training length and the RoPE chunk size it shows whether the model still uses its context
(the curve keeps falling), only ignores it (flat) or is confused by it (rises).

The fit is L(t) = a + b * t^-c on the cumulative average over every position, by least squares in
linear space: for fixed c, a and b are a linear least-squares problem, so c is found by a scan over
a log grid refined by golden-section search (no scipy needed, and no starting guess to tune).
a estimates the loss with unlimited context, c how fast context helps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def nll_by_position(model: nn.Module, docs: list[list[int]], length: int) -> np.ndarray:
    """Mean NLL (nats) of the token at each position 1..length-1, over documents at least `length`
    long."""
    device = next(model.parameters()).device
    rows = [d[:length] for d in docs if len(d) >= length]
    if not rows:
        raise ValueError(f"no held-out document has {length} tokens; lower the length (nll_len) or pass "
                         "longer files")
    total = torch.zeros(length - 1, dtype=torch.float64)
    for row in rows:
        ids = torch.tensor([row], device=device)
        logits = model(ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu()
    return (total / len(rows)).numpy()


def cumulative_average(nll: np.ndarray) -> np.ndarray:
    return np.cumsum(nll) / np.arange(1, len(nll) + 1)


def _solve_ab(t: np.ndarray, y: np.ndarray, c: float) -> tuple[float, float, float]:
    """(a, b, squared error) of the best a + b * t^-c for a fixed c."""
    X = np.stack([np.ones_like(t), t ** -c], 1)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(a), float(b), float(np.sum((X @ [a, b] - y) ** 2))


def fit_power_law(y: np.ndarray, t: np.ndarray | None = None) -> dict:
    """Least-squares fit of y(t) = a + b * t^-c (c in [1e-3, 10]; t defaults to 1..len(y)). Returns
    a, b, c and R^2 (1 - residual / total sum of squares)."""
    y = np.asarray(y, dtype=np.float64)
    t = np.arange(1, len(y) + 1, dtype=np.float64) if t is None else np.asarray(t, dtype=np.float64)
    if len(y) < 4:
        raise ValueError(f"a power-law fit needs at least 4 points, got {len(y)}")
    logc = np.linspace(math.log(1e-3), math.log(10.0), 60)
    errors = [_solve_ab(t, y, math.exp(v))[2] for v in logc]
    i = int(np.argmin(errors))
    lo, hi = logc[max(i - 1, 0)], logc[min(i + 1, len(logc) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search on log c around the best grid point
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if _solve_ab(t, y, math.exp(m1))[2] < _solve_ab(t, y, math.exp(m2))[2]:
            hi = m2
        else:
            lo = m1
    c = math.exp((lo + hi) / 2)
    a, b, sse = _solve_ab(t, y, c)
    total = float(np.sum((y - y.mean()) ** 2))
    # c at the edge of the search: the curve does not bend like a power law (at c -> 0, a + b t^-c
    # is a line in ln t with a and b growing without bound)
    at_bound = c < 1.1e-3 or c > 9.9
    return {"a": a, "b": b, "c": c, "r2": 1 - sse / total if total > 0 else 1.0, "c_at_bound": at_bound,
            "form": "a + b * t^-c, least squares on the cumulative average NLL"}


def segment_means(nll: np.ndarray, bounds: list[int]) -> list[dict]:
    """Mean NLL of the tokens at positions in (previous bound, bound], for each bound within the
    curve: compares the tokens just inside the training length with those past it."""
    out, start = [], 0
    for end in sorted({b for b in bounds if 0 < b <= len(nll)} | {len(nll)}):
        if end > start:
            out.append({"from": start + 1, "to": end, "mean_nll": float(np.mean(nll[start:end]))})
            start = end
    return out
