"""Verifiable tasks: splits that never overlap, levels, worked answers the checker accepts, and a
checker whose two rewards catch wrong answers and bad format separately."""

import re

import pytest

from herd.tasks import TASKS, Problem, get_task, parse_answer, word_list
from herd.tasks.letters import LetterCounting, worked_answer


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_never_share_a_key_and_are_reproducible(name):
    task = get_task(name)
    train = task.problems("train", 150)
    test = task.problems("test", 40)
    assert len(train) == 150 and len(test) == 40
    assert not {p.key for p in train} & {p.key for p in test}
    assert [p.prompt for p in task.problems("test", 40)] == [p.prompt for p in test]  # same args, same problems
    assert {p.level for p in train} == set(task.levels)
    assert all(p.task == name for p in train)


@pytest.mark.parametrize("name", list(TASKS))
def test_worked_answers_score_full_marks_and_wrong_answers_do_not(name):
    task = get_task(name)
    for p in task.problems("train", 30, seed=3):
        assert p.worked.splitlines()[-1] == f"Answer: {p.answer}"
        assert task.check(p, p.worked).answer == 1.0 and task.check(p, p.worked).format == 1.0
        wrong = p.worked.rsplit("Answer:", 1)[0] + "Answer: 9999"
        assert task.check(p, wrong).answer == 0.0 and task.check(p, wrong).format == 1.0


def test_format_and_answer_rewards_are_separate():
    task = get_task("arithmetic")
    p = Problem("arithmetic", "2 + 3", "What is 2 + 3?", "5", "2 + 3 = 5\nAnswer: 5", 1)
    assert task.check(p, "Answer: 5").format == 1.0
    assert task.check(p, "Answer: 5\nand some rambling after").format == 0.0  # not the last line
    assert task.check(p, "Answer: 5\nand some rambling after").answer == 1.0
    assert task.check(p, "Answer: 4\nAnswer: 5").format == 0.0  # two answer lines
    assert task.check(p, "the answer is 5") == task.check(p, "") == type(task.check(p, ""))(0.0, 0.0)
    assert task.check(p, "Answer: 5", stopped=False).format == 0.0  # cut off: not well-formed
    assert task.check(p, "Answer: 5.").answer == 1.0 and task.check(p, "Answer: 5 or 6").answer == 0.0
    assert parse_answer("work\n  Answer:  42  \n\n") == ("42", True)
    assert task.check(p, "Answer: 5").reward > task.check(p, "Answer: 5\nx").reward > task.check(p, "x").reward


def test_letter_counting_words_and_the_strawberry_case():
    words = word_list()
    assert len(words) > 1000 and all(w.isalpha() and w.islower() for w in words)
    assert worked_answer("strawberry", "r") == "Spelled out: s t r a w b e r r y\nr is at positions 3, 8, 9.\nAnswer: 3"
    task = LetterCounting(words=("strawberry", "blueberries", "raspberry", "elderberry", "cranberry"))
    problems = task.problems("train", 10, level=3)
    assert {p.key for p in problems} <= {"strawberry", "blueberries", "raspberry", "elderberry", "cranberry"}
    for p in problems:
        word = p.key
        letter = p.worked.splitlines()[1][0] if "There is no" not in p.worked else p.worked.split()[-1][0]
        assert p.answer == str(word.count(letter)) and word in p.prompt
    with pytest.raises(ValueError, match="levels"):
        task.problems("train", 1, level=7)


def test_one_digit_sums_are_counted_on_one_numbered_step_at_a_time():
    from herd.tasks.arithmetic import worked_answer as arithmetic_worked

    assert arithmetic_worked([8, 4], ["+"]) == "8 + 4: count up 4 from 8: 9 (1), 10 (2), 11 (3), 12 (4)\nAnswer: 12"
    assert arithmetic_worked([2, 3], ["-"]) == "2 - 3: count down 3 from 2: 1 (1), 0 (2), -1 (3)\nAnswer: -1"
    assert arithmetic_worked([5, 0], ["-"]) == "5 - 0: nothing to count\nAnswer: 5"
    assert arithmetic_worked([17, 25], ["+"]) == "17 + 25 = 42\nAnswer: 42"  # two digits: one line an operation
    for p in get_task("arithmetic").problems("train", 40, level=1):
        a, op, b = p.worked.split(":")[0].split()
        steps = p.worked.splitlines()[0].split(": ")[-1]
        assert steps == "nothing to count" or steps.count("(") == int(b)


def test_a_held_out_sum_is_held_out_in_either_order():
    import re

    task = get_task("arithmetic")
    expression = lambda p: re.search(r"\d+ [-+*] \d+", p.prompt).group(0)  # noqa: E731
    train = {expression(p) for p in task.problems("train", 150, level=1)}
    for p in task.problems("test", 30, level=1):
        a, op, b = expression(p).split()
        assert f"{a} {op} {b}" not in train
        if op == "+":
            assert f"{b} {op} {a}" not in train


def test_levels_get_harder():
    arithmetic = get_task("arithmetic")
    assert all(len(p.answer) <= 2 for p in arithmetic.problems("train", 20, level=1))
    assert all(p.prompt.count("+") + p.prompt.count("-") == 2 for p in arithmetic.problems("train", 20, level=4))
    letters = get_task("letters")
    assert all(len(p.key) >= 9 for p in letters.problems("train", 20, level=3))


def test_scene_questions_show_an_image_and_answer_from_the_scene():
    task = get_task("scenes")
    problems = task.problems("train", 30)
    assert all(p.image is not None and p.image.size == (64, 64) for p in problems)
    for p in problems:
        content = p.messages()[0]["content"]
        assert content[0]["type"] == "image" and content[1]["text"] == p.prompt
        if p.prompt.startswith("Where is"):
            assert p.answer in p.worked.splitlines()[0]  # the caption names the place
    assert p.messages(with_answer=True)[-1] == {"role": "assistant", "content": p.worked}
    # one question kind per level, levels in turn: each kind is a quarter of the problems
    kinds = (r"How many shapes", r"How many (red|green|blue|yellow) shapes", r"What color is the \w+\?",
             r"Where is the \w+\?")
    assert all(re.fullmatch(kinds[p.level - 1] + r".*", p.prompt) for p in problems)
    assert [p.level for p in problems[:8]] == [1, 2, 3, 4] * 2
    colour = next(p for p in problems if p.prompt.startswith("What color"))
    assert task.check(colour, f"Answer: {colour.answer.upper()}").answer == 1.0  # lenient on case
    with pytest.raises(ValueError, match="split"):
        task.problems("validation", 1)
