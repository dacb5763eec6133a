"""Loss, perplexity and bits per byte (SPEC 7): during training on fixed batches, and on whole
documents for `herd eval`.

Perplexity (exp of the mean NLL per token) depends on the tokenizer; bits per byte divides the
summed NLL (in bits) by the UTF-8 bytes the predicted tokens stand for, so it compares models with
different tokenizers. During training the bytes come from the tokens themselves: a byte-level BPE
token's stored form has one symbol per byte, and special tokens count zero bytes. On whole
documents they are simply the documents' bytes.

A model here is anything whose `model(input_ids [B, T]).logits` gives [B, T, V]: a herd `Llama4`,
or a `transformers` causal LM evaluated as a baseline through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import Tokenizer
from ..train.losses import IGNORE, Batch, causal_lm_loss


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    lengths = [0 if tokenizer.is_special(i) else len(tokenizer.token_text(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


class LMEvaluator:
    """Mean loss and bits per byte over a fixed set of validation batches (the training loop's
    `evaluate`)."""

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
def token_nlls(model: nn.Module, ids: Sequence[int], window: int) -> torch.Tensor:
    """NLL (nats, float64) of each of ids[1:] given the tokens before it, [len(ids) - 1].

    The targets are taken `window - 1` at a time; each forward pass is the window of `window`
    tokens that ends at its last target. So every token is predicted exactly once, consecutive
    windows overlap by one token, and the last, shorter piece reaches back for a full window of
    context (the rolling windows of lm-eval's loglikelihood_rolling, so the two agree)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    device = next(model.parameters()).device
    out = []
    for first in range(1, len(ids), window - 1):  # targets ids[first:end]
        end = min(first + window - 1, len(ids))
        piece = torch.tensor([list(ids[max(0, end - window):end])], device=device)  # [1, T]
        logits = model(piece).logits[0, :-1].float()  # [T-1, V]: predicts piece[1:]
        nll = F.cross_entropy(logits, piece[0, 1:], reduction="none").double().cpu()
        out.append(nll[-(end - first):])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class TextScore:
    """Summed NLL over documents, with what it is divided by."""

    nll: float  # nats
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the documents
    documents: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": math.exp(self.loss), "bpb": self.nll / math.log(2) / max(self.bytes, 1),
                "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def score_texts(model: nn.Module, encode: Callable[[str], list[int]], texts: Sequence[str], window: int) -> TextScore:
    """Perplexity and bits per byte of whole documents. `encode` gives a document's ids with the
    begin-of-text token first; that token is context only, so every byte of the text is predicted."""
    nll, tokens, n_bytes = 0.0, 0, 0
    for text in texts:
        nlls = token_nlls(model, encode(text), window)
        nll += float(nlls.sum())
        tokens += len(nlls)
        n_bytes += len(text.encode("utf-8"))
    return TextScore(nll, tokens, n_bytes, len(texts))
