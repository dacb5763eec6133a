"""Data curation: exact deduplication, MetaCLIP balancing, and a quality-filter hook.

MetaCLIP balancing (Xu et al., 2023), the curation behind Llama 4's vision encoder data: given a
list of concepts ("metadata entries"), a pair is a candidate only if its text contains at least
one concept as a substring. Count the candidates of each concept (n). Each concept keeps each of
its pairs with probability min(1, t / n), and a pair survives if any of its matched concepts keeps
it. Frequent "head" concepts are thus capped near t pairs while the long tail is kept whole, which
flattens the concept distribution the encoder learns from.

Matching here is a plain substring test over the lower-cased text (as MetaCLIP's, "cat" also
matches "concatenate"); it is O(texts x concepts), fine for herd's scale, where MetaCLIP uses
Aho-Corasick for 500k entries. Draws come from one seeded generator in pair order, so the result is
deterministic given the seed and the input order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def exact_dedup(items: Sequence[T], key: Callable[[T], str] = str) -> tuple[list[T], int]:
    """(first occurrence of each distinct key(item), number of duplicates dropped)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        h = content_hash(key(item))
        if h not in seen:
            seen.add(h)
            kept.append(item)
    return kept, len(items) - len(kept)


def quality_filter(items: Sequence[T], keep: Callable[[T], bool]) -> tuple[list[T], int]:
    """(items the quality hook keeps, number dropped). The hook is any callable item -> bool,
    e.g. a classifier score compared with a threshold."""
    kept = [item for item in items if keep(item)]
    return kept, len(items) - len(kept)


@dataclass(frozen=True)
class ConceptCount:
    concept: str
    matched: int  # candidate pairs whose text contains the concept (n)
    kept: int  # of those, pairs that survived balancing (through this or another concept)


@dataclass
class BalanceResult:
    kept: list[int]  # indices into the input texts, in input order
    concepts: list[ConceptCount]  # in the order of the concept list
    unmatched: int  # pairs matching no concept (always dropped)
    t: int

    def report(self) -> str:
        width = max([len(c.concept) for c in self.concepts] + [7])
        lines = [f"MetaCLIP balancing, t = {self.t}: kept {len(self.kept)} pairs, "
                 f"dropped {self.unmatched} matching no concept",
                 f"{'concept':<{width}}  {'matched':>8}  {'kept':>8}  {'dropped':>8}"]
        for c in self.concepts:
            lines.append(f"{c.concept:<{width}}  {c.matched:>8}  {c.kept:>8}  {c.matched - c.kept:>8}")
        return "\n".join(lines)


def match_concepts(texts: Sequence[str], concepts: Sequence[str], lowercase: bool = True) -> list[list[int]]:
    """For each text, the indices of the concepts it contains as substrings."""
    keys = [c.lower() if lowercase else c for c in concepts]
    out = []
    for text in texts:
        text = text.lower() if lowercase else text
        out.append([j for j, c in enumerate(keys) if c in text])
    return out


def metaclip_balance(texts: Sequence[str], concepts: Sequence[str], t: int, *, seed: int = 0,
                     lowercase: bool = True) -> BalanceResult:
    """Which pairs (by their texts) MetaCLIP balancing keeps, with per-concept counts."""
    if t < 1:
        raise ValueError(f"the balancing threshold t must be a positive count, got {t}")
    if len(set(concepts)) != len(concepts):
        raise ValueError("the concept list has duplicates; each concept must appear once")
    matches = match_concepts(texts, concepts, lowercase)
    counts = np.zeros(len(concepts), dtype=np.int64)
    for m in matches:
        counts[m] += 1
    keep_prob = np.minimum(1.0, t / np.maximum(counts, 1))
    rng = np.random.default_rng(seed)
    kept = []
    kept_per_concept = np.zeros(len(concepts), dtype=np.int64)
    for i, m in enumerate(matches):
        if not m:
            continue
        # One draw per matched concept; the pair survives if any concept keeps it.
        if np.any(rng.random(len(m)) < keep_prob[m]):
            kept.append(i)
            kept_per_concept[m] += 1
    stats = [ConceptCount(c, int(n), int(k)) for c, n, k in zip(concepts, counts, kept_per_concept)]
    return BalanceResult(kept, stats, sum(1 for m in matches if not m), t)
