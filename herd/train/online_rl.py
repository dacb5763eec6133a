"""Online RL's data: a prompt pool the policy keeps re-filtering, and batches of scored rollouts.

    data = OnlineRollouts(policy, tokenizer, candidates, prompts=8, group_size=4, max_new_tokens=64,
                          refilter_every=10)
    loss_fn(model, next(data))            # an RLBatch for GRPOLoss, carrying the rollouts' metrics

Each batch: draw `prompts` problems from the pool (a shuffled cycle over it), sample `group_size`
completions of each with the policy as it is now, score them with the tasks' checkers, keep the
groups whose rewards are not all equal (the others have zero advantage, so no gradient) and draw
again until the batch is full or `max_attempts` draws were made (DAPO's dynamic sampling). Every
`refilter_every` batches, starting with the first, the policy answers every candidate `group_size`
times and the pool becomes the candidates whose pass rate lies strictly inside the window
(`keep_window`): medium-to-hard prompts, a curriculum that hardens as the policy improves (Llama
4's continuous online RL). The candidates mix the tasks, text and image, so every batch does.

Logged per batch (sums and counts, through the loss): reward, accuracy, format, completion
tokens, the fraction of sampled groups dropped as zero-advantage, the draws it took, the pool's
size and its mean pass rate at the last re-filtering.

This sits apart from herd.train.rollouts because it uses the difficulty tagger, which uses rollouts.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..tasks import Problem, Task
from .difficulty import keep_window
from .post_losses import RLBatch
from .rollouts import Rollouts, concat_rollouts, sample_rollouts

if TYPE_CHECKING:
    from ..data.images import ImageProcessor
    from ..tokenizer import Tokenizer

SEED_STRIDE = 1_000_003  # sampling call c seeds its rows seed + c * SEED_STRIDE + row: never the same twice


class OnlineRollouts:
    """A DataSource of RLBatches sampled from `policy` (herd.train.loop). Its state (the pool as
    candidate indices, the position in the current order, the order's epoch, the number of sampling
    calls, which seeds the next one) makes a resumed run draw and sample exactly what it would have.
    `tasks` overrides the checker of a task by name (as in `sample_rollouts`)."""

    def __init__(self, policy: nn.Module, tokenizer: "Tokenizer", candidates: Sequence[Problem], *, prompts: int,
                 group_size: int, max_new_tokens: int, refilter_every: int, max_attempts: int = 4,
                 window: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0, seed: int = 0,
                 image_processor: "ImageProcessor | None" = None, tasks: Mapping[str, Task] | None = None):
        if not 1 <= prompts <= len(candidates):
            raise ValueError(f"prompts per batch must be between 1 and the {len(candidates)} candidates, got {prompts}")
        if refilter_every < 1 or max_attempts < 1:
            raise ValueError(f"refilter_every and max_attempts must be positive, got {refilter_every}, {max_attempts}")
        self.policy, self.tokenizer, self.candidates = policy, tokenizer, list(candidates)
        self.prompts, self.group_size, self.max_new_tokens = prompts, group_size, max_new_tokens
        self.refilter_every, self.max_attempts, self.window = refilter_every, max_attempts, window
        self.temperature, self.seed, self.image_processor, self.tasks = temperature, seed, image_processor, tasks
        self.pool = list(range(len(self.candidates)))
        self.position = self.epoch = self.calls = self.batches = 0
        self.pool_pass_rate = 0.0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"pool": list(self.pool), "position": self.position, "epoch": self.epoch, "calls": self.calls,
                "batches": self.batches, "pool_pass_rate": self.pool_pass_rate}

    def load_state_dict(self, state: dict) -> None:
        self.pool = list(state["pool"])
        self.position, self.epoch, self.calls = state["position"], state["epoch"], state["calls"]
        self.batches, self.pool_pass_rate = state["batches"], state["pool_pass_rate"]

    # ---------------------------------------------------------------- sampling
    def _sample(self, problems: Sequence[Problem]) -> Rollouts:
        was_training = self.policy.training
        self.policy.eval()
        try:
            return sample_rollouts(self.policy, self.tokenizer, problems, group_size=self.group_size,
                                   max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   seed=self.seed + self.calls * SEED_STRIDE, image_processor=self.image_processor,
                                   tasks=self.tasks)
        finally:
            self.calls += 1
            self.policy.train(was_training)

    def _draw(self) -> list[Problem]:
        """The next `prompts` problems of the pool in this epoch's shuffled order; a new epoch reshuffles."""
        if self.position + self.prompts > len(self.pool):
            self.epoch, self.position = self.epoch + 1, 0
        order = list(self.pool)
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        picked = order[self.position:self.position + self.prompts]
        self.position += self.prompts
        return [self.candidates[i] for i in picked]

    def refilter(self) -> None:
        """The policy answers every candidate; the pool keeps those inside the pass-rate window (the old
        pool stays if fewer than a batch's worth would)."""
        rollouts = self._sample(self.candidates)
        rates = rollouts.grouped(rollouts.answer_rewards).mean(1).tolist()  # pass@1 from group_size samples
        kept, _ = keep_window(list(range(len(self.candidates))), rates, *self.window)
        if len(kept) >= self.prompts:
            self.pool = kept
        self.pool_pass_rate = sum(rates) / len(rates)
        self.epoch, self.position = self.epoch + 1, 0

    def __next__(self) -> RLBatch:
        if self.batches % self.refilter_every == 0:
            self.refilter()
        self.batches += 1
        sampled, kept, n_kept = [], [], 0
        for _ in range(self.max_attempts):
            rollouts = self._sample(self._draw())
            sampled.append(rollouts)
            informative = rollouts.informative()
            informative &= torch.cumsum(informative, 0) <= self.prompts - n_kept  # no more than a batch
            if informative.any():
                kept.append(rollouts.select(informative))
                n_kept += int(informative.sum())
            if n_kept == self.prompts:
                break
        # With no informative group at all the last draw trains as it is: zero advantages, no gradient.
        batch = concat_rollouts(kept, self.tokenizer.pad_id) if kept else sampled[-1]
        total = lambda value: sum(float(value(r)) for r in sampled)  # noqa: E731  over every sampled group
        rows, groups = total(len), total(lambda r: len(r.problems))
        metrics = {"reward": (total(lambda r: r.rewards.sum()), rows),
                   "accuracy": (total(lambda r: r.answer_rewards.sum()), rows),
                   "format": (total(lambda r: r.format_rewards.sum()), rows),
                   "completion_tokens": (total(lambda r: r.assistant_mask.sum()), rows),
                   "zero_advantage_groups": (total(lambda r: (~r.informative()).sum()), groups),
                   "draws": (float(len(sampled)), 1), "pool": (float(len(self.pool)), 1),
                   "pool_pass_rate": (self.pool_pass_rate, 1)}
        return RLBatch(batch.batch, batch.advantages(), metrics=metrics)
