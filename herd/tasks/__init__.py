"""Verifiable tasks: procedurally generated problems with a train pool, a held-out test split,
difficulty levels, worked answers and a checker (format and answer rewards). Shared by SFT, RL,
DPO and evaluation.

    task = get_task("letters")
    problems = task.problems("train", 100)
    score = task.check(problems[0], completion)   # Score(format=1.0, answer=0.0)
"""

from .arithmetic import Arithmetic
from .base import ANSWER_PREFIX, Problem, Score, Split, Task, parse_answer
from .clips import ClipQuestions
from .letters import LetterCounting, word_list
from .scenes import SceneQuestions

TASKS = {"letters": LetterCounting, "arithmetic": Arithmetic, "scenes": SceneQuestions, "clips": ClipQuestions}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["ANSWER_PREFIX", "Arithmetic", "ClipQuestions", "LetterCounting", "Problem", "SceneQuestions", "Score",
           "Split", "TASKS", "Task", "get_task", "parse_answer", "word_list"]
