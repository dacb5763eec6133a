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
`candidates` may be a function of the re-filtering round giving that round's candidates: with
procedurally generated tasks each round then scores fresh problems, so the policy cannot learn a
small pool by heart (docs/post-training.md measures it).

Logged per batch (sums and counts, through the loss): reward, accuracy, format, completion
tokens, the fraction of sampled groups dropped as zero-advantage, the draws it took, the rollouts
sampled (a total over the ranks), the pool's size and its mean pass rate at the last re-filtering.

Under torchrun (`rank`, `world_size`) `prompts` is per rank: every draw is the one a single process
with `prompts * world_size` would make, and rank r samples its block of it, its rows seeded as that
process would seed them; the ranks keep drawing in step (until every rank's batch is full, or
`max_attempts`), so their positions in the pool's order stay equal. Re-filtering shares the
candidates out (each rank scores a block, the pass rates are all-gathered), so every rank keeps the
same pool. `policy` must then be a plain, unsharded copy of the weights on each rank (the recipe
refreshes it before each step), since generating runs a different number of forwards per rank.

This sits apart from herd.train.rollouts because it uses the difficulty tagger, which uses rollouts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..distributed.sharing import every_rank, share_work
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
    calls, which seeds the next one, the re-filtering round, which picks fresh candidates) makes a
    resumed run draw and sample exactly what it would have.
    `tasks` overrides the checker of a task by name (as in `sample_rollouts`). `tile_shape` (C, S, S):
    a batch without images carries empty pixel_values, so that every rank runs the vision tower."""

    def __init__(self, policy: nn.Module, tokenizer: "Tokenizer",
                 candidates: Sequence[Problem] | Callable[[int], Sequence[Problem]], *, prompts: int,
                 group_size: int, max_new_tokens: int, refilter_every: int, max_attempts: int = 4,
                 window: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0, seed: int = 0,
                 image_processor: "ImageProcessor | None" = None, tasks: Mapping[str, Task] | None = None,
                 rank: int = 0, world_size: int = 1, tile_shape: tuple[int, int, int] | None = None):
        fixed = None if callable(candidates) else list(candidates)
        self.candidates_of = candidates if fixed is None else (lambda _round: fixed)  # round -> its candidates
        candidates = list(self.candidates_of(0))
        if not 1 <= prompts * world_size <= len(candidates):
            raise ValueError(f"prompts per batch ({prompts}) times the {world_size} process(es) must be between 1 and "
                             f"the {len(candidates)} candidates; lower the prompts or add candidates")
        if refilter_every < 1 or max_attempts < 1:
            raise ValueError(f"refilter_every and max_attempts must be positive, got {refilter_every}, {max_attempts}")
        self.policy, self.tokenizer, self.candidates = policy, tokenizer, candidates
        self.prompts, self.group_size, self.max_new_tokens = prompts, group_size, max_new_tokens
        self.refilter_every, self.max_attempts, self.window = refilter_every, max_attempts, window
        self.temperature, self.seed, self.image_processor, self.tasks = temperature, seed, image_processor, tasks
        self.rank, self.world_size, self.tile_shape = rank, world_size, tile_shape
        self.pool = list(range(len(self.candidates)))
        self.position = self.epoch = self.calls = self.batches = self.rounds = self.pool_round = 0
        self.pool_pass_rate = 0.0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"pool": list(self.pool), "position": self.position, "epoch": self.epoch, "calls": self.calls,
                "batches": self.batches, "pool_pass_rate": self.pool_pass_rate, "rounds": self.rounds,
                "pool_round": self.pool_round}

    def load_state_dict(self, state: dict) -> None:
        self.pool = list(state["pool"])
        self.position, self.epoch, self.calls = state["position"], state["epoch"], state["calls"]
        self.batches, self.pool_pass_rate = state["batches"], state["pool_pass_rate"]
        self.rounds, self.pool_round = state.get("rounds", 0), state.get("pool_round", 0)
        self.candidates = list(self.candidates_of(self.pool_round))  # the candidates the saved pool indexes

    # ---------------------------------------------------------------- sampling
    def _sample(self, problems: Sequence[Problem], first_row: int = 0) -> Rollouts:
        """Rollouts of `problems` whose rows are rows `first_row`... of this sampling call."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            return sample_rollouts(self.policy, self.tokenizer, problems, group_size=self.group_size,
                                   max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   seed=self.seed + self.calls * SEED_STRIDE + first_row,
                                   image_processor=self.image_processor, tasks=self.tasks)
        finally:
            self.policy.train(was_training)

    def _draw(self) -> list[Problem]:
        """This rank's block of the next `prompts * world_size` problems of the pool in this epoch's
        shuffled order; a new epoch reshuffles."""
        size = self.prompts * self.world_size
        if self.position + size > len(self.pool):
            self.epoch, self.position = self.epoch + 1, 0
        order = list(self.pool)
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        picked = order[self.position + self.rank * self.prompts:self.position + (self.rank + 1) * self.prompts]
        self.position += size
        return [self.candidates[i] for i in picked]

    def refilter(self) -> None:
        """The policy answers every candidate (each rank a block); the pool keeps those inside the
        pass-rate window (the old pool stays if fewer than a batch's worth would). With fresh
        candidates, each round after the first scores a new set."""
        def pass_rates(block: list[Problem], start: int) -> list[float]:  # pass@1 from group_size samples
            rollouts = self._sample(block, first_row=start * self.group_size)
            return rollouts.grouped(rollouts.answer_rewards).mean(1).tolist()

        candidates = list(self.candidates_of(self.rounds)) if self.rounds else self.candidates  # round 0: built
        rates = share_work(pass_rates, candidates, self.rank, self.world_size)
        self.calls += 1
        kept, _ = keep_window(list(range(len(candidates))), rates, *self.window)
        if len(kept) >= self.prompts * self.world_size:
            self.candidates, self.pool, self.pool_round = candidates, kept, self.rounds
        self.rounds += 1
        self.pool_pass_rate = sum(rates) / len(rates)
        self.epoch, self.position = self.epoch + 1, 0

    def __next__(self) -> RLBatch:
        if self.batches % self.refilter_every == 0:
            self.refilter()
        self.batches += 1
        sampled, kept, n_kept = [], [], 0
        for draws in range(1, self.max_attempts + 1):
            problems = self._draw()  # every rank draws, full or not, so that the ranks stay in step
            if n_kept < self.prompts:
                rollouts = self._sample(problems, first_row=self.rank * self.prompts * self.group_size)
                sampled.append(rollouts)
                informative = rollouts.informative()
                informative &= torch.cumsum(informative, 0) <= self.prompts - n_kept  # no more than a batch
                if informative.any():
                    kept.append(rollouts.select(informative))
                    n_kept += int(informative.sum())
            self.calls += 1
            if every_rank(n_kept == self.prompts, self.world_size):
                break
        # With no informative group at all the last draw trains as it is: zero advantages, no gradient.
        batch = concat_rollouts(kept, self.tokenizer.pad_id) if kept else sampled[-1]
        if batch.batch.pixel_values is None and self.tile_shape is not None:
            batch.batch.pixel_values = torch.zeros(0, *self.tile_shape)
        total = lambda value: sum(float(value(r)) for r in sampled)  # noqa: E731  over every sampled group
        rows, groups = total(len), total(lambda r: len(r.problems))
        metrics = {"reward": (total(lambda r: r.rewards.sum()), rows),
                   "accuracy": (total(lambda r: r.answer_rewards.sum()), rows),
                   "format": (total(lambda r: r.format_rewards.sum()), rows),
                   "completion_tokens": (total(lambda r: r.assistant_mask.sum()), rows),
                   "zero_advantage_groups": (total(lambda r: (~r.informative()).sum()), groups),
                   # counted once (rank 0), so that the ranks' sums add up to a total, not a mean
                   "rollouts": (rows, float(self.rank == 0)),
                   "draws": (float(draws), 1), "pool": (float(len(self.pool)), 1),
                   "pool_pass_rate": (self.pool_pass_rate, 1)}
        return RLBatch(batch.batch, batch.advantages(), metrics=metrics)
