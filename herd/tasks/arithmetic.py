"""Small arithmetic, worked step by step: "What is 17 + 25 - 8?".

Levels: 1 = a + b or a - b with one-digit numbers, 2 = two-digit + and -, 3 = a one-digit times a
two-digit number, 4 = three two-digit numbers with + and -, evaluated left to right. The
expression is the split key, with the operands of a two-term sum or product in order ("4 + 3" is
keyed "3 + 4"), so a held-out problem's mirror image is held out too. The worked answer writes
one operation per line; a one-digit sum or difference is counted on (or down) instead, one numbered
step at a time ("8 + 4: count up 4 from 8: 9 (1), 10 (2), 11 (3), 12 (4)"): a held-out one-digit
fact cannot be recalled, only worked out, and each step is a successor a small model can learn (the
tiny default model answered "10" to most of them after SFT on the bare fact, and counts after SFT
on this).
"""

from __future__ import annotations

import operator

from .base import Problem, Task, same_integer

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TEMPLATES = ("What is {e}?", "Compute {e}.", "{e} = ?")


def _terms(rng, level: int) -> tuple[list[int], list[str]]:
    if level == 1:
        return [rng.randint(0, 9), rng.randint(0, 9)], [rng.choice("+-")]
    if level == 2:
        return [rng.randint(10, 99), rng.randint(10, 99)], [rng.choice("+-")]
    if level == 3:
        return [rng.randint(2, 9), rng.randint(11, 99)], ["*"]
    return [rng.randint(10, 99) for _ in range(3)], [rng.choice("+-"), rng.choice("+-")]


def counted_answer(a: int, op: str, b: int) -> str:
    """One-digit sums and differences counted on (or down) one step at a time, each step numbered."""
    step = 1 if op == "+" else -1
    values = [a + step * i for i in range(1, b + 1)]
    how = f"count {'up' if step > 0 else 'down'} {b} from {a}: " + ", ".join(f"{v} ({i})" for i, v in
                                                                             enumerate(values, 1))
    return f"{a} {op} {b}: " + (how if b else "nothing to count") + f"\nAnswer: {OPS[op](a, b)}"


def worked_answer(numbers: list[int], ops: list[str]) -> str:
    if len(numbers) == 2 and ops[0] in "+-" and max(numbers) < 10:
        return counted_answer(numbers[0], ops[0], numbers[1])
    lines, value = [], numbers[0]
    for op, b in zip(ops, numbers[1:]):
        new = OPS[op](value, b)
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    return "\n".join(lines + [f"Answer: {value}"])


class Arithmetic(Task):
    name = "arithmetic"
    levels = (1, 2, 3, 4)

    def _candidate(self, rng, level: int) -> Problem:
        numbers, ops = _terms(rng, level)
        expression = " ".join([str(numbers[0])] + [f"{op} {b}" for op, b in zip(ops, numbers[1:])])
        worked = worked_answer(numbers, ops)
        answer = worked.rsplit("Answer: ", 1)[1]
        key = expression
        if ops in (["+"], ["*"]):
            key = f"{min(numbers)} {ops[0]} {max(numbers)}"
        return Problem(self.name, key, rng.choice(TEMPLATES).format(e=expression), answer, worked, level)

    def _same(self, given: str, truth: str) -> bool:
        return same_integer(given, truth)
