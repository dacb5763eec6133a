"""What every verifiable task shares: the problem, the answer format and the checker.

A completion is well-formed when its last non-empty line is `Answer: <answer>` and no other line
starts with `Answer:`; everything above that line is free-form working. The checker gives two
rewards, both in {0, 1} and both logged: `format` (the completion is well-formed and stopped on its
own) and `answer` (the answer on the last `Answer:` line is right). They are separate so that RL can
see a model learn the format before it learns the task, and DPO can prefer tidy answers.

Splits: each task names every problem by a key (the word, the expression, the scene) and sends a
key to the held-out `test` split iff `stable_fraction(key)` is below the task's test fraction, so
the train pool and the test split never share a key on any machine or Python version, and growing
the pool never moves a key between them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from ..data.corpora import stable_fraction

Split = Literal["train", "test"]
ANSWER_PREFIX = "Answer:"
_ANSWER_LINE = re.compile(r"^\s*Answer:\s*(.*?)\s*$")


@dataclass(frozen=True)
class Problem:
    task: str
    key: str  # what decides the split: problems with the same key are in the same split
    prompt: str  # the user's question
    answer: str  # the canonical answer, as the `Answer:` line should give it
    worked: str  # a worked solution that ends with the `Answer:` line (SFT's target)
    level: int  # difficulty, 1 = easiest
    image: Image.Image | None = field(default=None, compare=False)  # shown before the question
    images: tuple[Image.Image, ...] = field(default=(), compare=False)  # several, in order, before the question
    video: tuple[Image.Image, ...] = field(default=(), compare=False)  # a clip's frames, before the question

    def messages(self, with_answer: bool = False) -> list[dict]:
        """The problem as a chat: the user asks (showing the image(s) or the video first);
        with_answer adds the worked solution as the assistant's reply."""
        shown = [{"type": "image", "image": im} for im in ((self.image,) if self.image else ()) + self.images]
        if self.video:
            shown.append({"type": "video", "video": list(self.video), "frames": len(self.video)})
        content = [*shown, {"type": "text", "text": self.prompt}] if shown else self.prompt
        messages = [{"role": "user", "content": content}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.worked})
        return messages


@dataclass(frozen=True)
class Score:
    format: float  # 1.0 iff the completion is well-formed and stopped on its own
    answer: float  # 1.0 iff its answer is right

    @property
    def reward(self) -> float:
        """The scalar RL optimises: the answer counts, the format is a small shaping bonus."""
        return self.answer + 0.1 * self.format


def parse_answer(completion: str) -> tuple[str | None, bool]:
    """(answer on the last `Answer:` line or None, whether the completion is well-formed)."""
    lines = [line for line in completion.splitlines() if line.strip()]
    answer_lines = [i for i, line in enumerate(lines) if _ANSWER_LINE.match(line)]
    if not answer_lines:
        return None, False
    answer = _ANSWER_LINE.match(lines[answer_lines[-1]]).group(1)
    well_formed = answer_lines == [len(lines) - 1] and answer != ""
    return answer, well_formed


def in_split(key: str, split: Split, test_fraction: float) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return (stable_fraction(key) < test_fraction) == (split == "test")


class Task:
    """A procedurally generated, checkable task. Subclasses set `name`, `levels`, `test_fraction`
    and implement `_candidate(rng, level)` (a random problem, any split) and `_same(given, truth)`."""

    name: str = ""
    levels: tuple[int, ...] = (1,)
    test_fraction: float = 0.2
    vision: bool = False  # its problems show images: only for models with a vision tower

    def problems(self, split: Split, count: int, *, seed: int = 0, level: int | None = None) -> list[Problem]:
        """`count` distinct problems of `split` (at `level`, or levels in turn), the same for the same
        arguments."""
        if level is not None and level not in self.levels:
            raise ValueError(f"{self.name} has levels {self.levels}, got level={level}")
        rng = random.Random(f"{self.name}:{split}:{seed}:{level}")
        found: dict[tuple[str, str], Problem] = {}
        tries = 0
        while len(found) < count:
            tries += 1
            if tries > 200 * count + 1000:
                raise ValueError(f"{self.name}: could not find {count} distinct {split} problems"
                                 f"{'' if level is None else f' at level {level}'}; ask for fewer")
            lvl = level if level is not None else self.levels[len(found) % len(self.levels)]
            problem = self._candidate(rng, lvl)
            if problem is not None and in_split(problem.key, split, self.test_fraction):
                found.setdefault((problem.key, problem.prompt), problem)
        return list(found.values())

    def check(self, problem: Problem, completion: str, *, stopped: bool = True) -> Score:
        """Scores `completion` (the assistant's text); `stopped` is False when it was cut off."""
        answer, well_formed = parse_answer(completion)
        right = answer is not None and self._same(answer, problem.answer)
        return Score(format=float(well_formed and stopped), answer=float(right))

    def _candidate(self, rng: random.Random, level: int) -> Problem | None:
        raise NotImplementedError

    def _same(self, given: str, truth: str) -> bool:
        raise NotImplementedError


def same_integer(given: str, truth: str) -> bool:
    """`given` states the integer `truth` ("3", "3.", " 3 ", "+3"; not "3 or 4")."""
    given = given.strip().rstrip(".").strip().replace(",", "")
    return re.fullmatch(r"[+-]?\d+", given) is not None and int(given) == int(truth)

