"""Counting a letter in a word: "How many r's are in strawberry?" (Llama 4 said 2).

Words come from a real word list that ships with every Python: the English prose of the
standard library's documentation topics (`pydoc_data/topics.py`, the text `help()` shows), reduced
to lowercase words of 3 to 14 letters that occur at least twice. No download, and no Unix word
file needed. A word decides the split, so a held-out word is never seen in training, with any
letter.

The worked answer spells the word out one letter per token-ish piece, then counts: the failure
this task probes is that a BPE model sees "strawberry" as two or three tokens, not ten letters.
Levels: 1 = up to 5 letters, 2 = 6 to 8, 3 = 9 or more.
"""

from __future__ import annotations

import functools
import re
import sysconfig
from collections import Counter
from pathlib import Path

from .base import Problem, Task, same_integer

TEMPLATES = ("How many {l}'s are in {w}?",
             "How many times does the letter {l} appear in the word \"{w}\"?",
             "Count the letter '{l}' in {w}.")


@functools.cache
def word_list() -> tuple[str, ...]:
    """Sorted English words from the stdlib's documentation text."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Python ships without pydoc_data, which the "
                                "letter-counting task reads its words from; install the full standard library")
    counts = Counter(re.findall(r"(?<![A-Za-z0-9_])[a-z]{3,14}(?![A-Za-z0-9_])", path.read_text("utf-8")))
    return tuple(sorted(w for w, n in counts.items() if n >= 2))


def _level(word: str) -> int:
    return 1 if len(word) <= 5 else 2 if len(word) <= 8 else 3


def worked_answer(word: str, letter: str) -> str:
    n = word.count(letter)
    where = [str(i + 1) for i, c in enumerate(word) if c == letter]
    found = f"{letter} is at position{'s' if n > 1 else ''} {', '.join(where)}." if n else f"There is no {letter}."
    return f"Spelled out: {' '.join(word)}\n{found}\nAnswer: {n}"


class LetterCounting(Task):
    name = "letters"
    levels = (1, 2, 3)

    def __init__(self, words: tuple[str, ...] | None = None):
        self.words = words if words is not None else word_list()
        self.by_level = {lvl: [w for w in self.words if _level(w) == lvl] for lvl in self.levels}

    def _candidate(self, rng, level: int) -> Problem | None:
        if not self.by_level[level]:
            return None
        word = rng.choice(self.by_level[level])
        # Mostly a letter of the word (a repeated one when there is), sometimes one it lacks: the
        # answer 0 must be learnable too.
        repeated = [c for c in sorted(set(word)) if word.count(c) > 1]
        if rng.random() < 0.15:
            letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
        else:
            letter = rng.choice(repeated if repeated and rng.random() < 0.6 else sorted(set(word)))
        prompt = rng.choice(TEMPLATES).format(l=letter, w=word)
        return Problem(self.name, word, prompt, str(word.count(letter)), worked_answer(word, letter), level)

    def _same(self, given: str, truth: str) -> bool:
        return same_integer(given, truth)
