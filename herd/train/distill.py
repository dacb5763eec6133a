"""Codistillation (SPEC 6): Maverick learnt from Behemoth's next-token distributions as well as from
the data, "dynamically weighting the soft and hard targets through training". Meta published no
formula; this is herd's, per target token t with label y_t, teacher logits z_t and student logits s_t:

    soft_t = tau^2 * KL(softmax(z_t / tau) || softmax(s_t / tau))     (the soft target)
    hard_t = -log softmax(s_t)[y_t]                                     (the hard target)
    loss_t = w_t * soft_t + (1 - w_t) * hard_t

The tau^2 keeps the soft term's gradient on the scale of the hard one's whatever the temperature
(Hinton et al., 2015). The soft-target weight w_t is
- `fixed`:   w_t = alpha, every token, every step;
- `dynamic`: w_t = schedule(step) * confidence_t, where
  schedule falls linearly from `alpha` at the first step to `alpha_end` at the last: early on the
  teacher's whole distribution tells the student far more per token than a one-hot label; later the
  student has learnt what the teacher can give and the data's own labels take over;
  confidence_t = 1 - H(softmax(z_t)) / log V is 1 where the teacher is sure and 0 where its
  distribution is uniform: where the teacher does not know, its soft target is mostly noise and the
  label counts more.
The weights are functions of the teacher and the step only, so no gradient flows through them.
`fixed` is the default: in experiments/codistill.py (docs/training.md) a fixed 0.9 beat both
dynamic schedules at tiny scale, where the teacher is unsure and its broad distributions are the
very tokens the confidence factor takes the soft target away from.

The teacher is either frozen (`DistillationLoss(teacher)`: listed in `frozen`, so the loop keeps it
in eval mode without gradients and never optimises or saves it; under FSDP parallelise it as the
model) or trained in the same run (`train_teacher=True`, true codistillation: the teacher is a
submodule of the loss, so the loop optimises and checkpoints it; it learns from the hard targets
alone, and the student from its current, detached distribution). A trained teacher's MoE layers
get no load balancing (the balancer watches the student).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .losses import IGNORE, Batch, LossOutput


class DistillationLoss(nn.Module):
    """`loss_fn(student, batch)` for the training loop: soft and hard targets mixed per token."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, weighting: str = "fixed",
                 alpha: float = 0.9, alpha_end: float = 0.3, train_teacher: bool = False):
        super().__init__()
        if weighting not in ("fixed", "dynamic"):
            raise ValueError(f"distillation weighting must be fixed or dynamic, got {weighting!r}")
        for name, value in (("alpha", alpha), ("alpha_end", alpha_end)):
            if not 0 <= value <= 1:
                raise ValueError(f"distillation {name} is a weight in [0, 1], got {value}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        self.temperature, self.weighting, self.alpha, self.alpha_end = temperature, weighting, alpha, alpha_end
        self.train_teacher = train_teacher
        if train_teacher:
            self.teacher = teacher.train().requires_grad_(True)  # a submodule: optimised and saved with the loss
            self.frozen: dict[str, nn.Module] = {}
        else:
            self.frozen = {"teacher": teacher}  # a plain dict: not a submodule, never optimised or saved
        self.progress = 0.0  # fraction of training done, set by on_step

    @classmethod
    def from_config(cls, teacher: nn.Module, cfg: TrainConfig) -> "DistillationLoss":
        return cls(teacher, temperature=cfg.distill_temperature, weighting=cfg.distill_weighting,
                   alpha=cfg.distill_alpha, alpha_end=cfg.distill_alpha_end, train_teacher=cfg.train_teacher)

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher if self.train_teacher else self.frozen["teacher"]

    def on_step(self, context) -> None:
        """Called by the loop before each step's micro-batches: where the schedule stands."""
        self.progress = context.step / max(context.steps - 1, 1)

    def soft_weight(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[N, V] teacher logits of the target positions -> [N] weight of the soft target."""
        if self.weighting == "fixed":
            return teacher_logits.new_full(teacher_logits.shape[:1], self.alpha)
        return (self.alpha + (self.alpha_end - self.alpha) * self.progress) * teacher_confidence(teacher_logits)

    def forward(self, model: nn.Module, batch: Batch) -> LossOutput:
        inputs = dict(pixel_values=batch.pixel_values, document_ids=batch.document_ids,
                      attention_mask=batch.attention_mask)
        out = model(batch.input_ids, **inputs)
        with torch.set_grad_enabled(self.train_teacher and torch.is_grad_enabled()):
            teacher_out = self.teacher_model(batch.input_ids, **inputs)
        if teacher_out.logits.shape[-1] != out.logits.shape[-1]:
            raise ValueError(f"the teacher's vocabulary ({teacher_out.logits.shape[-1]}) differs from the student's "
                             f"({out.logits.shape[-1]}); distillation needs the same tokenizer")
        targets = batch.labels != IGNORE  # [B, T]
        labels = batch.labels[targets]  # [N]
        student = out.logits[targets].float()  # [N, V]
        teacher = teacher_out.logits[targets].float()  # [N, V]
        hard = F.cross_entropy(student, labels, reduction="none")  # [N]
        soft = soft_target_loss(student, teacher.detach(), self.temperature)  # [N]
        with torch.no_grad():
            weight = self.soft_weight(teacher)  # [N]
            confidence = teacher_confidence(teacher)
        loss_sum = (weight * soft + (1 - weight) * hard).sum()
        teacher_hard = F.cross_entropy(teacher, labels, reduction="sum")
        if self.train_teacher:
            loss_sum = loss_sum + teacher_hard
        n = int(targets.sum())
        metrics = {"hard_loss": (hard.detach().sum(), n), "soft_loss": (soft.detach().sum(), n),
                   "soft_weight": (weight.sum(), n), "teacher_confidence": (confidence.sum(), n),
                   "teacher_loss": (teacher_hard.detach(), n)}
        return LossOutput(loss_sum, n, out.router, metrics)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 KL(teacher || student) at temperature tau, per row: [N, V], [N, V] -> [N]."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_teacher.exp() * (log_teacher - log_student)).sum(-1)


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """1 - entropy / log V of the teacher's distribution (temperature 1): [N, V] -> [N] in [0, 1]."""
    log_p = F.log_softmax(teacher_logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (1 - entropy / math.log(teacher_logits.shape[-1])).clamp(0, 1)


def load_teacher(path: str | Path, student: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """A herd checkpoint in the Hugging Face layout, checked against the student: the same
    vocabulary and special tokens (the same tokenizer), or a clear error."""
    from ..hf import from_pretrained

    teacher = from_pretrained(path, device=device)
    mine, theirs = student.config.text, teacher.config.text
    for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(mine, name) != getattr(theirs, name):
            raise ValueError(f"teacher {path} has {name}={getattr(theirs, name)} but the student has "
                             f"{getattr(mine, name)}: distillation needs a teacher trained with the student's "
                             "tokenizer (pass --tokenizer=<the teacher run's tokenizer folder>)")
    return teacher
