"""Data for herd's offline lm-eval tasks, generated here from what herd ships: held-out Python
standard-library code (the validation split herd never trains on) and the arithmetic task's
held-out problems. No download; the same documents on every machine.

lm-eval calls these through `custom_dataset: !function herd_offline.<name>` in the YAMLs beside
this file, with the YAML's `dataset_kwargs` (here `docs`, how many documents) as arguments.
"""

from __future__ import annotations

import random


def _dataset(docs: list[dict]):
    import datasets  # lm-eval's own dependency

    return {"test": datasets.Dataset.from_list(docs)}


def _code_lines(files: int = 40) -> list[tuple[str, str]]:
    """(the lines before, the line) for each mid-length line of the first held-out files."""
    from herd.data.corpora import stdlib_texts

    pairs = []
    for doc in stdlib_texts("validation", max_files=files):
        lines = doc.text.splitlines(keepends=True)
        for i in range(3, len(lines)):
            if 12 <= len(lines[i].strip()) <= 60:
                pairs.append(("".join(lines[i - 3:i]), lines[i]))
    return pairs


def code_choice(docs: int = 16, **_) -> dict:
    """Which of four lines comes next after three lines of code (the other three drawn from
    elsewhere in the held-out files)? A multiple-choice task."""
    rng = random.Random("herd_code_choice")
    pairs = _code_lines()
    rows = []
    for context, line in rng.sample(pairs, docs):
        others = [o for _, o in rng.sample(pairs, 8) if o != line][:3]
        choices = others + [line]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "answer": choices.index(line)})
    return _dataset(rows)


def code_next(docs: int = 16, **_) -> dict:
    """Three lines of code and the line after them, scored as a continuation (loglikelihood)."""
    rng = random.Random("herd_code_next")
    return _dataset([{"context": c, "line": line} for c, line in rng.sample(_code_lines(), docs)])


def code_files(docs: int = 4, max_chars: int = 600, **_) -> dict:
    """Whole held-out files (cut at a line boundary to at most max_chars), scored token by token
    (loglikelihood_rolling: perplexity and bits per byte)."""
    from herd.data.corpora import stdlib_texts

    rows = []
    for doc in stdlib_texts("validation"):
        if len(rows) == docs:
            break
        if len(doc.text) >= max_chars:
            rows.append({"text": doc.text[: doc.text.rindex("\n", 0, max_chars) + 1]})
    return _dataset(rows)


def arithmetic(docs: int = 8, **_) -> dict:
    """Held-out problems of herd's arithmetic task (herd.tasks), answered by generation."""
    from herd.tasks import get_task

    return _dataset([{"question": p.prompt, "answer": p.answer}
                     for p in get_task("arithmetic").problems("test", docs, level=1)])
