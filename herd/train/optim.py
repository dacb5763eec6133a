"""AdamW with per-parameter learning-rate multipliers, and the learning-rate schedules.

Weight decay applies to matrices only: decaying norms, biases or the embedding table pulls them
towards zero for no benefit. Each parameter group carries `lr_mult` (1, or MetaP's multiplier), and
the schedule sets `lr = base_lr * schedule(step) * lr_mult` on every group before each step, so
the schedule itself has no state beyond the step number.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on the base lr at optimiser step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: constant, then linear to the floor over the last decay_fraction
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1.0, cfg.steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
                    lr_mults: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by (decay?, lr multiplier)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = defaultdict(list)
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "embed" not in name and "positional_embedding" not in name
        groups[(decay, (lr_mults or {}).get(name, 1.0))].append(p)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult,
                     "lr": cfg.lr * mult} for (decay, mult), ps in sorted(groups.items())]
    # foreach: one multi-tensor kernel per update term instead of a Python loop over parameters (on a
    # CPU the per-parameter loop is the default), the same arithmetic (tests/test_train.py checks it)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    lr = cfg.lr * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr
