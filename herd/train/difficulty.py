"""Tagging training data by how hard the current model finds it, to keep only the hard part.

Llama 4's SFT dropped what the model itself found easy (over half the data for Scout and Maverick,
95% for Behemoth), and its online RL kept re-filtering prompts to medium-to-hard ones. Two scores:

- verifiable prompts: pass@k, the chance that at least one of k samples is right, estimated without
  bias from n >= k samples of which c were right (Chen et al. 2021):
      pass@k = 1 - C(n - c, k) / C(n, k)
  computed as a product so that large n does not overflow. An easy prompt has pass@k near 1.
- open-ended ones (no checker): the model's mean loss on the reference answer's tokens; a low loss
  means the model already writes that answer, so the example teaches little.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from ..tasks import Problem
from .losses import IGNORE, Batch
from .post_losses import token_logprobs
from .rollouts import sample_rollouts

T = TypeVar("T")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    fail = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        fail *= 1.0 - k / i
    return 1.0 - fail


def pass_rates(model: nn.Module, tokenizer, problems: Sequence[Problem], *, n: int, k: int = 1,
               max_new_tokens: int, **sampling) -> list[float]:
    """pass@k of `model` on each problem, from n sampled answers (sampling options as
    `sample_rollouts`: temperature, top_p, seed, image_processor, tasks)."""
    rollouts = sample_rollouts(model, tokenizer, problems, group_size=n, max_new_tokens=max_new_tokens, **sampling)
    correct = rollouts.grouped(rollouts.answer_rewards).sum(1)
    return [pass_at_k(n, int(c), k) for c in correct]


@torch.no_grad()
def loss_difficulty(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token loss of each row's targets [B] (higher = harder); rows without targets get 0."""
    out = model(batch.input_ids, pixel_values=batch.pixel_values, document_ids=batch.document_ids,
                attention_mask=batch.attention_mask)
    nll = -token_logprobs(out.logits, batch.labels)
    return nll.sum(1) / (batch.labels != IGNORE).sum(1).clamp(min=1)


def drop_easy(items: Sequence[T], easiness: Sequence[float | tuple], threshold: float, keep: float = 1.0
              ) -> tuple[list[T], float]:
    """Drops what is easy: the items whose easiness reaches `threshold`, then, of the rest, all but
    the `keep` share of `items` that is hardest (lowest easiness). An easiness may be a tuple, compared
    in order (a pass rate, then minus the answer's loss to rank the prompts a model never solves);
    its first element meets the threshold. Returns (kept items in their order, fraction dropped).

    `keep` < 1 is what makes SFT light even for a model that solves nothing yet: Llama 4 dropped over
    half its SFT data as easy, judged by the model being trained."""
    if len(items) != len(easiness):
        raise ValueError(f"{len(items)} items but {len(easiness)} scores; give one score per item")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    keys = [e if isinstance(e, tuple) else (e,) for e in easiness]
    hard = [i for i, key in enumerate(keys) if key[0] < threshold]
    hardest = sorted(hard, key=lambda i: keys[i])[:max(1, round(keep * len(items)))] if hard else []
    kept = [items[i] for i in sorted(hardest)]
    return kept, (1 - len(kept) / len(items)) if items else 0.0


def keep_window(items: Sequence[T], pass_rates: Sequence[float], low: float = 0.0, high: float = 1.0
                ) -> tuple[list[T], float]:
    """Online RL's curriculum: keeps the items whose pass rate lies strictly between `low` and `high`
    (medium-to-hard: neither always solved nor never). Returns (kept items, fraction dropped)."""
    if len(items) != len(pass_rates):
        raise ValueError(f"{len(items)} items but {len(pass_rates)} pass rates; give one per item")
    kept = [item for item, p in zip(items, pass_rates) if low < p < high]
    return kept, (1 - len(kept) / len(items)) if items else 0.0
