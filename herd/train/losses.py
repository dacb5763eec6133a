"""Losses the training loop can optimise, and the batch they read.

A loss returns a *sum* over its targets and the number of targets, never a mean: the loop adds sums
over micro-batches and data-parallel ranks and divides once by the global count, so gradient
accumulation and any number of processes give the same update as one big batch. The metrics a loss
reports (KL, rewards, weights) are sums and counts for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import IGNORE, Batch  # noqa: F401  (the one batch type and ignore label)
from ..model.moe import RouterStats


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: summed over targets
    count: int  # number of targets
    router: list[RouterStats]
    # name -> (sum, count), logged as sum / count after summing both over micro-batches and ranks
    metrics: dict[str, tuple[torch.Tensor | float, float]] = field(default_factory=dict)


def causal_lm_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Next-token cross-entropy (labels are already shifted: labels[t] is the token after t)."""
    out = model(batch.input_ids, pixel_values=batch.pixel_values, document_ids=batch.document_ids,
                attention_mask=batch.attention_mask, targets=batch.labels)
    return LossOutput(out.loss_sum, int((batch.labels != IGNORE).sum()), out.router)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE between tiles and captions, for pretraining the vision encoder.

    The image side is the vision encoder's output (adapter included) mean-pooled over its tokens;
    the text side is the language model's token embeddings mean-pooled over the caption. Each gets
    a linear head into a shared space; the heads and the learnable temperature live here, in the
    loss, and are dropped after the stage: only the encoder is kept.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int = 128):
        super().__init__()
        self.image_head = nn.Linear(image_dim, dim, bias=False)
        self.text_head = nn.Linear(text_dim, dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial value

    def embed_images(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(model.vision(pixel_values).mean(1)), dim=-1)  # [N, dim]

    def embed_texts(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = model.embed_tokens(ids) * mask[..., None]  # [N, L, D]
        pooled = emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_head(pooled), dim=-1)

    def forward(self, model: nn.Module, batch: Batch) -> LossOutput:
        img = self.embed_images(model, batch.pixel_values)
        txt = self.embed_texts(model, batch.input_ids, batch.attention_mask)
        logits = img @ txt.T * self.log_temperature.clamp(max=math.log(100)).exp()  # [N, N]
        target = torch.arange(len(img), device=img.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return LossOutput(loss * len(img), len(img), [])
