"""Verifiable tasks: sample answers, check each with the task's own checker, report pass@1 and pass@k.

This module scores tasks; it defines none (the task sets live in herd.tasks, shared with
post-training; `held_out` wraps their held-out problems). A task is any object with
- `prompt`: a string (continued as plain text) or a list of chat messages (rendered with the chat
  template and an assistant header; images in the messages are tiled for the vision tower);
- `check(completion: str) -> bool`: whether a completion (chat: the assistant's reply) is right;
- optionally `kind`: the name results are grouped under (default "tasks").

pass@k is the unbiased estimator of Chen et al. (2021, the Codex paper): with n samples of which c
pass, the chance that k drawn without replacement include a pass, 1 - C(n-c, k) / C(n, k),
averaged over tasks. It has lower variance than drawing k samples once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from typing import Protocol

import torch

from ..model import Llama4
from ..tasks import Problem, get_task
from ..tokenizer import Tokenizer


class Task(Protocol):
    prompt: str | list[dict]

    def check(self, completion: str) -> bool: ...


@dataclass(frozen=True)
class HeldOut:
    """A held-out problem of one of herd's verifiable tasks (herd.tasks), as `score_tasks` takes it:
    the chat that asks it, and right when the task's checker finds the answer right."""

    problem: Problem

    @property
    def prompt(self) -> list[dict]:
        return self.problem.messages()

    @property
    def kind(self) -> str:
        return self.problem.task

    def check(self, completion: str) -> bool:
        return get_task(self.problem.task).check(self.problem, completion).answer == 1.0


def held_out(names: Sequence[str], count: int, vision: bool) -> tuple[list[HeldOut], dict[str, str]]:
    """`count` test-split problems of each named task (levels in turn), and the tasks left out with
    why: the image tasks (scenes, clips) when the model has no vision tower."""
    problems, skipped = [], {}
    for name in names:
        task = get_task(name)
        if task.vision and not vision:
            skipped[name] = "its questions are about images and the model has no vision tower"
            continue
        problems += [HeldOut(p) for p in task.problems("test", count)]
    return problems, skipped


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of n samples (c of them correct) passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def _prompt_ids(task: Task, model: Llama4, tokenizer: Tokenizer) -> tuple[list[int], torch.Tensor | None]:
    if isinstance(task.prompt, str):
        return tokenizer.encode(task.prompt, bos=True), None
    from ..chat import render_chat

    processor = None
    if model.config.vision is not None:
        from ..data.images import ImageProcessor

        processor = ImageProcessor.from_config(model.config.vision)
    rendered = render_chat(task.prompt, tokenizer, add_generation_prompt=True, image_processor=processor)
    return rendered.ids, rendered.pixel_values


@torch.no_grad()
def score_tasks(model: Llama4, tokenizer: Tokenizer, tasks: Sequence[Task], samples: int = 4,
                ks: Sequence[int] = (1, 4), temperature: float = 0.6, max_new_tokens: int = 32, seed: int = 0) -> dict:
    """{kind: {"tasks", "samples", "pass@k" for each k, "examples"}} over `samples` sampled answers per task."""
    from ..inference import generate

    if any(k > samples for k in ks):
        raise ValueError(f"pass@k needs k <= samples; got ks={list(ks)} with samples={samples}")
    by_kind: dict[str, dict] = {}
    for t, task in enumerate(tasks):
        ids, pixels = _prompt_ids(task, model, tokenizer)
        new = min(max_new_tokens, model.config.text.max_position_embeddings - len(ids))
        out = generate(model, torch.tensor([ids] * samples), new, temperature=temperature, seed=seed + t,
                       pixel_values=None if pixels is None else pixels.repeat(samples, 1, 1, 1),
                       stop_token_ids=list(tokenizer.stop_ids))
        completions = [tokenizer.decode(row[len(ids):].tolist(), skip_special=True) for row in out]
        passed = [bool(task.check(c)) for c in completions]
        correct = sum(passed)
        kind = by_kind.setdefault(getattr(task, "kind", "tasks"), {"tasks": 0, "samples": samples, "examples": [],
                                                                   **{f"pass@{k}": 0.0 for k in ks}})
        kind["tasks"] += 1
        for k in ks:
            kind[f"pass@{k}"] += pass_at_k(samples, correct, k)
        if len(kind["examples"]) < 3:
            kind["examples"].append({"prompt": str(task.prompt)[:200], "completion": completions[0],
                                     "correct": passed[0]})
    for kind in by_kind.values():
        for k in ks:
            kind[f"pass@{k}"] /= kind["tasks"]
    return by_kind
