"""Validation during training: loss, bits per byte, and NLL by position (SPEC 7).

Bits per byte divides the summed NLL (in bits) by the UTF-8 bytes of the predicted tokens, so it
compares models with different tokenizers. A byte-level BPE token's stored form has one symbol per
byte, which gives each token's byte length without decoding; special tokens count zero bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import Tokenizer
from .losses import IGNORE, Batch, causal_lm_loss


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    lengths = [0 if tokenizer.is_special(i) else len(tokenizer.token_text(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


class LMEvaluator:
    """Mean loss and bits per byte over a fixed set of validation batches."""

    def __init__(self, batches: list[Batch], byte_lengths: torch.Tensor | None = None):
        self.batches, self.byte_lengths = batches, byte_lengths

    def __call__(self, model: nn.Module) -> dict:
        device = next(model.parameters()).device
        nll, count, n_bytes = 0.0, 0, 0
        for batch in self.batches:
            out = causal_lm_loss(model, batch.to(device))
            nll += out.loss_sum.item()
            count += out.count
            if self.byte_lengths is not None:
                targets = batch.labels[batch.labels != IGNORE]
                n_bytes += int(self.byte_lengths[targets].sum())
        result = {"loss": nll / max(count, 1)}
        if self.byte_lengths is not None:
            result["bpb"] = nll / math.log(2) / max(n_bytes, 1)
        return result


@torch.no_grad()
def nll_by_position(model: nn.Module, docs: list[list[int]], length: int) -> np.ndarray:
    """Mean NLL (nats) of the token at each position 1..length-1, over documents at least `length`
    long. The cumulative average of this curve should fall with position and flatten."""
    device = next(model.parameters()).device
    rows = [d[:length] for d in docs if len(d) >= length]
    if not rows:
        raise ValueError(f"no held-out document has {length} tokens; lower nll_len")
    total = torch.zeros(length - 1, dtype=torch.float64)
    for row in rows:
        ids = torch.tensor([row], device=device)
        logits = model(ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu()
    return (total / len(rows)).numpy()
