"""Activation checkpointing: keep only each block's input and recompute its insides in backward.

Applied from outside the model, like FP8 and FSDP: each decoder layer (and vision layer) gets an
instance `forward` that runs the class's forward under `torch.utils.checkpoint` (non-reentrant, so
any output structure and autograd through the router statistics work). Setting `forward` on the
instance keeps module names and state-dict keys unchanged (torch's `checkpoint_wrapper` would add a
`_checkpoint_wrapped_module.` level to every key), and FSDP's hooks, which wrap `__call__`, stay
outside the recomputed region, as torchtitan orders them. Memory per layer falls from every
intermediate (attention scores, MoE buffers) to one [B, T, D] input; compute rises by one forward.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_activations(model: nn.Module) -> int:
    """Recomputes every transformer block of `model` in backward; returns how many blocks."""
    blocks = list(model.layers) + (list(model.vision.layers) if getattr(model, "vision", None) is not None else [])
    for block in blocks:
        if "forward" in vars(block):  # already applied
            continue
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
    return len(blocks)
