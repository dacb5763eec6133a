"""Work every rank shares outside the model's collectives: generation for post-training.

Under FSDP2 a forward of the sharded model is a sequence of collectives, so every rank must run
the same number of them. Generating (held-out accuracy, difficulty tags, RL rollouts, DPO pairs)
runs a different number of decode steps on each rank, so it uses a plain, unsharded copy of the
weights per rank instead (`herd.train.loop.InferenceCopy`); then each rank generates a share of
the items alone and the results are exchanged once:

    results = share_work(work, items, rank, world_size)   # work(block, start) on each rank's block

In one process `share_work` is `work(items, 0)` and `every_rank(flag)` is `flag`, so the
one-process path runs the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items (sizes differ by at most one)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def share_work(work: Callable[[list[T], int], list[R]], items: Sequence[T], rank: int, world_size: int) -> list[R]:
    """Each rank runs `work(its block of items, the block's first index)`; the blocks' result lists,
    gathered from every rank (a collective: every rank calls this), are concatenated in rank order,
    so each rank gets the same list, in the items' order when `work` returns one result per item.
    The start index lets a rank seed its rows as one process would seed the same rows."""
    if world_size == 1:
        return list(work(list(items), 0))
    start, end = block(len(items), rank, world_size)
    mine = list(work(list(items[start:end]), start)) if end > start else []
    parts: list[list[R]] = [[] for _ in range(world_size)]
    dist.all_gather_object(parts, mine)
    return [r for part in parts for r in part]


def every_rank(flag: bool, world_size: int) -> bool:
    """True when `flag` is True on every rank (a collective under torchrun)."""
    if world_size == 1:
        return flag
    flags: list[bool] = [False] * world_size
    dist.all_gather_object(flags, bool(flag))
    return all(flags)
