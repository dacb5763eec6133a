"""Post-training losses: DPO against a frozen reference, and GRPO's clipped token-level objective.

Both follow herd's loss contract (herd.train.losses): a `loss_fn(model, batch)` returns a *sum*
and the number of terms it sums, so micro-batches and ranks add up before one division. The
metrics they log ride along the same way, as (sum, count) pairs.

DPO (Rafailov et al. 2023), the sigmoid loss, per pair of a chosen y+ and a rejected y- answer:

    r(y)  = beta * (log pi(y|x) - log ref(y|x))             implicit reward
    loss  = -log sigmoid(r(y+) - r(y-))                       = log 2 when pi == ref
          (+ nll_weight * -log pi(y+|x) / |y+|)               the NLL term on the chosen answer
                                                              (Pang et al. 2024), which stops the
                                                              chosen log-probabilities from falling

GRPO (Shao et al. 2024) with DAPO's changes (Yu et al. 2025), per completion token t of a
completion with advantage A (herd.train.rollouts gives A, group-relative):

    ratio = pi(t) / pi_old(t)
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)   clip-higher: eps_high > eps_low
    kl    = ref(t)/pi(t) - log(ref(t)/pi(t)) - 1                         Schulman's k3 estimator, >= 0
    loss  = sum over all completion tokens (pg + kl_beta * kl) / number of completion tokens

The token mean over the whole batch (not a mean per completion, then over completions) is DAPO's:
long completions weigh by their length, so rambling is not diluted. With one optimiser step per
rollout batch pi_old is pi itself (detached): the ratio is 1, and the gradient is the policy gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..chat import RenderedChat
from .losses import IGNORE, Batch, LossOutput


# --------------------------------------------------------------------------------------------
# Log-probabilities of targets
# --------------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) under logits [B, T, V] -> [B, T] (fp32), 0 where labels == IGNORE."""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return logp.view(labels.shape)


def answer_rows(rendered: Sequence[RenderedChat], pad_id: int) -> Batch:
    """Rendered chats as right-padded rows [B, T] whose targets are what the renderer supervises:
    labels[t] = ids[t + 1] where loss_mask[t + 1], else IGNORE. Padding is never a target."""
    T = max(len(r) for r in rendered)
    ids = torch.full((len(rendered), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rendered), T, dtype=torch.long)
    labels = torch.full((len(rendered), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rendered):
        row, mask = torch.tensor(r.ids), torch.tensor(r.loss_mask)
        ids[i, :len(r)] = row
        attention[i, :len(r)] = 1
        labels[i, :len(r) - 1] = torch.where(mask[1:], row[1:], IGNORE)
    tiles = [r.pixel_values for r in rendered if r.pixel_values is not None]
    return Batch(ids, labels, pixel_values=torch.cat(tiles) if tiles else None, attention_mask=attention)


def _forward(model: nn.Module, batch: Batch):
    return model(batch.input_ids, pixel_values=batch.pixel_values, document_ids=batch.document_ids,
                 attention_mask=batch.attention_mask)


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each row's targets [B] (a frozen reference's, for DPO)."""
    return token_logprobs(_forward(model, batch).logits, batch.labels).sum(1)


@torch.no_grad()
def target_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token log-probabilities of the targets [B, T] (a reference's or the sampling policy's, for GRPO)."""
    return token_logprobs(_forward(model, batch).logits, batch.labels)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

@dataclass
class DPOTerms:
    losses: torch.Tensor  # [P] per pair
    chosen_rewards: torch.Tensor  # [P] beta * (log pi - log ref) of the chosen answers (detached)
    rejected_rewards: torch.Tensor  # [P]


def dpo_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
              ref_rejected_logps: torch.Tensor, beta: float) -> DPOTerms:
    """The sigmoid DPO loss per pair, from summed sequence log-probabilities [P]."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return DPOTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


@dataclass
class PreferenceBatch:
    """P pairs as one batch of 2P rows, the P chosen rows first: one forward for both sides."""

    batch: Batch  # [2P, T] with labels on the answer tokens only
    ref_logps: torch.Tensor | None = None  # [2P] the reference's `sequence_logprobs`; None: DPOLoss's reference

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    @classmethod
    def build(cls, pairs: Sequence[tuple[RenderedChat, RenderedChat]], reference: nn.Module, pad_id: int
              ) -> "PreferenceBatch":
        """Rows of (chosen, rejected) renderings, with the frozen reference's log-probabilities."""
        batch = answer_rows([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
        return cls(batch, sequence_logprobs(reference, batch))

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(self.batch.to(device), None if self.ref_logps is None else self.ref_logps.to(device))


class DPOLoss:
    """`loss_fn(model, PreferenceBatch)`: summed DPO loss over the pairs, count = pairs. With a
    `reference` model, batches without `ref_logps` get them from it; it sits in `frozen`, so the
    training loop keeps it in eval mode, never optimises it and never checkpoints it."""

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0, reference: nn.Module | None = None):
        self.frozen = {} if reference is None else {"reference": reference}
        if beta <= 0:
            raise ValueError(f"beta must be positive (it scales the implicit reward), got {beta}")
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        self.beta, self.nll_weight = beta, nll_weight

    def __call__(self, model: nn.Module, prefs: PreferenceBatch) -> LossOutput:
        ref_logps = prefs.ref_logps
        if ref_logps is None:
            if "reference" not in self.frozen:
                raise ValueError("this PreferenceBatch has no ref_logps: build DPOLoss(reference=frozen_model)")
            ref_logps = sequence_logprobs(self.frozen["reference"], prefs.batch)
        out = _forward(model, prefs.batch)
        logp = token_logprobs(out.logits, prefs.batch.labels)  # [2P, T]
        P = logp.shape[0] // 2
        seq = logp.sum(1)
        terms = dpo_terms(seq[:P], seq[P:], ref_logps[:P], ref_logps[P:], self.beta)
        loss = terms.losses.sum()
        chosen_tokens = (prefs.batch.labels[:P] != IGNORE).sum(1).clamp(min=1)
        nll = (-seq[:P] / chosen_tokens).sum()  # per-token NLL of each chosen answer, summed over pairs
        if self.nll_weight:
            loss = loss + self.nll_weight * nll
        margins = terms.chosen_rewards - terms.rejected_rewards
        metrics = {"dpo_loss": (float(terms.losses.detach().sum()), P),
                   "reward_chosen": (float(terms.chosen_rewards.sum()), P),
                   "reward_rejected": (float(terms.rejected_rewards.sum()), P),
                   "reward_margin": (float(margins.sum()), P),
                   "reward_accuracy": (float((margins > 0).float().sum()), P),
                   "nll_chosen": (float(nll.detach()), P)}
        return LossOutput(loss, P, out.router, metrics)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: rewards [N_groups, G] -> (r - group mean) / (group std + eps), or
    r - group mean when `scale` is False (Dr. GRPO: no bias towards groups of similar rewards).
    The std is the sample std (n - 1), as TRL computes it. A group of equal rewards gets 0."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2 completions per prompt, got {list(rewards.shape)}")
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[N_groups] True where a group's rewards are not all equal: the rest carry no gradient (their
    advantages are all 0), so dynamic sampling drops them and refills the batch."""
    return (rewards != rewards[:, :1]).any(1)


@dataclass
class RLBatch:
    """Prompt + sampled completion rows (right-padded) with what the GRPO loss needs."""

    batch: Batch  # input_ids, attention_mask, pixel_values; labels = completion tokens, IGNORE elsewhere
    advantages: torch.Tensor  # [B] one per completion
    old_logps: torch.Tensor | None = None  # [B, T] of the policy that sampled; None: the current one
    ref_logps: torch.Tensor | None = None  # [B, T] of the frozen reference, for the KL term
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # the rollouts' (sum, count), logged

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    def to(self, device) -> "RLBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RLBatch(self.batch.to(device), self.advantages.to(device), move(self.old_logps), move(self.ref_logps),
                       self.metrics)


@dataclass
class GRPOTerms:
    losses: torch.Tensor  # [B, T] per-token loss, 0 off the completions
    clipped: torch.Tensor  # [B, T] bool: the clip took the gradient away
    kl: torch.Tensor  # [B, T] k3 estimate, 0 off the completions or without a reference


def grpo_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               eps_low: float = 0.2, eps_high: float = 0.28, ref_logps: torch.Tensor | None = None,
               kl_beta: float = 0.0) -> GRPOTerms:
    """Clipped surrogate per token. logps, old_logps, ref_logps, mask [B, T]; advantages [B]."""
    A = advantages[:, None].to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * A
    losses = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped) & mask  # min took the clamped term: no gradient from this token
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + kl_beta * kl
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    return GRPOTerms(torch.where(mask, losses, zero), was_clipped, torch.where(mask, kl, zero).detach())


class GRPOLoss:
    """`loss_fn(model, RLBatch)`: summed per-token GRPO loss, count = completion tokens (DAPO's token mean).
    With a `reference` model, batches without `ref_logps` get them from it, so the KL to it is
    logged (and trained against when kl_beta > 0); it sits in `frozen`, like DPOLoss's. The
    batch's own metrics (the rollouts' rewards) are logged with the loss's."""

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, kl_beta: float = 0.0,
                 reference: nn.Module | None = None):
        if not (0 < eps_low < 1 and eps_high > 0):
            raise ValueError(f"need 0 < eps_low < 1 and eps_high > 0, got eps_low={eps_low}, eps_high={eps_high}")
        if kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
        self.eps_low, self.eps_high, self.kl_beta = eps_low, eps_high, kl_beta
        self.frozen = {} if reference is None else {"reference": reference}

    def __call__(self, model: nn.Module, rl: RLBatch) -> LossOutput:
        ref_logps = rl.ref_logps
        if ref_logps is None and "reference" in self.frozen:
            ref_logps = target_logprobs(self.frozen["reference"], rl.batch)
        if self.kl_beta and ref_logps is None:
            raise ValueError("kl_beta > 0 needs the reference's log-probabilities: RLBatch.ref_logps or "
                             "GRPOLoss(reference=frozen_model)")
        out = _forward(model, rl.batch)
        labels = rl.batch.labels
        mask = labels != IGNORE
        logps = token_logprobs(out.logits, labels)
        old = rl.old_logps if rl.old_logps is not None else logps.detach()
        terms = grpo_terms(logps, old, rl.advantages, mask, eps_low=self.eps_low, eps_high=self.eps_high,
                           ref_logps=ref_logps, kl_beta=self.kl_beta)
        n = int(mask.sum())
        with torch.no_grad():
            logits = out.logits.float()[mask]  # [n, V]
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum()
        metrics = {**rl.metrics, "clip_fraction": (float(terms.clipped.sum()), n), "entropy": (float(entropy), n)}
        if ref_logps is not None:
            metrics["kl"] = (float(terms.kl.sum()), n)
        return LossOutput(terms.losses.sum(), n, out.router, metrics)
