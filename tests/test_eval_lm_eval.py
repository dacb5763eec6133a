"""The `herd` model type for lm-evaluation-harness, offline: a local task (YAML + JSONL written
here, loaded through `dataset_path: json`), no network, no hub downloads.

lm-eval is an optional extra (`herd[eval]`) and heavy (datasets, pandas, scikit-learn, ...); it is
not in the `test` extra, so on a machine without it these tests skip, saying why."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'herd[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from herd.eval.lm_eval_model import HerdLM  # noqa: E402
from herd.eval.perplexity import score_texts  # noqa: E402
from herd.inference import generate  # noqa: E402
from tests.test_eval import run_dir  # noqa: E402,F401  (the tiny checkpoint fixture)


@pytest.fixture(scope="module")
def lm(run_dir):  # noqa: F811
    return HerdLM(pretrained=str(run_dir / "model"), batch_size=2, max_length=16, max_gen_toks=8)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_as_herd():
    assert get_model("herd") is HerdLM


def test_loglikelihood_is_the_continuations_log_probability(lm):
    tok, model = lm.tokenizer_, lm.model
    pairs = [("def f(x):", " return x"), ("import ", "os"), ("", "class A:"),
             ("def long_function_name(argument):\n    return", " argument")]  # longer than max_length (16)
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (score, greedy) in zip(pairs, got):
        spaces = len(context) - len(context.rstrip())  # lm-eval moves a context's trailing spaces
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces:] + continuation
        whole = tok.encode(context + continuation, bos=True)
        n = len(whole) - len(tok.encode(context, bos=True))  # the continuation's tokens
        whole = whole[-(lm.max_length + 1):]  # the window the model sees, the last token only a target
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        positions = range(len(whole) - n, len(whole))
        assert math.isclose(score, sum(logp[i - 1, whole[i]].item() for i in positions), abs_tol=1e-4)
        assert greedy == all(int(logp[i - 1].argmax()) == whole[i] for i in positions)
    assert len(tok.encode(pairs[3][0] + pairs[3][1], bos=True)) > 17


def test_loglikelihood_rolling_equals_herd_eval_perplexity(lm):
    """Windows of max_length (16) predicted tokens: the same sum as herd eval with window 17."""
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    assert len(lm.tokenizer_.encode(text)) > 40  # several windows
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    score = score_texts(lm.model, lambda s: lm.tokenizer_.encode(s, bos=True), [text], 17)
    assert math.isclose(-rolling, score.nll, rel_tol=1e-5)


def test_generate_until_is_greedy_herd_generation_cut_at_the_stop_string(lm):
    tok = lm.tokenizer_
    (text,) = lm.generate_until(_requests("generate_until", [("import os\n", {"until": ["\n\n"], "max_gen_toks": 6})]))
    ids = tok.encode("import os\n", bos=True)
    full = generate(lm.model, torch.tensor([ids]), 6, temperature=0.0, stop_token_ids=list(tok.stop_ids))
    expected = tok.decode(full[0, len(ids):].tolist(), skip_special=True).split("\n\n")[0]
    assert text == expected


TASK = """\
task: herd_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""

DOCS = [{"question": "import", "choices": [" os", " zzzq", " 12"], "answer": 0},
        {"question": "def f(x):\n    return", "choices": [" x", " ]]]", " ("], "answer": 0},
        {"question": "for i in", "choices": [" range(3):", " )))(((", " 0"], "answer": 1},
        {"question": "class", "choices": [" A:", " :", " ="], "answer": 2}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "herd_toy.yaml").write_text(TASK.format(data=data))
    return folder


def _expected_accuracy(lm):
    correct = 0
    for doc in DOCS:
        scores = [s for s, _ in lm.loglikelihood(_requests("loglikelihood", [(doc["question"], c) for c in doc["choices"]]))]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(DOCS)


def test_local_task_through_lm_eval(lm, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=lm, tasks=["herd_toy"], task_manager=TaskManager(include_path=str(task_dir)))
    assert math.isclose(results["results"]["herd_toy"]["acc,none"], _expected_accuracy(lm))


def test_command_line_registers_herd(run_dir, task_dir, lm, tmp_path):  # noqa: F811
    """`python -m herd.eval.lm_eval_model` is lm-eval's own command line with `herd` registered."""
    cmd = [sys.executable, "-m", "herd.eval.lm_eval_model", "--model", "herd", "--model_args",
           f"pretrained={run_dir / 'model'},max_length=16", "--tasks", "herd_toy", "--include_path", str(task_dir),
           "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, textwrap.shorten(done.stderr, 2000)
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["herd_toy"]["acc,none"]
    assert math.isclose(acc, _expected_accuracy(lm))
