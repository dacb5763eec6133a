"""The `herd` model type for lm-evaluation-harness, offline: a local task (YAML + JSONL written
here, loaded through `dataset_path: json`), no network, no hub downloads.

lm-eval is an optional extra (`herd[eval]`) and heavy (datasets, pandas, scikit-learn, ...); it is
not in the `test` extra, so on a machine without it these tests skip, saying why."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

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


# ---- the shipped offline tasks, in process and through `herd serve`

TASKS_DIR = Path(__file__).resolve().parents[1] / "herd" / "eval" / "lm_eval_tasks"
OFFLINE = ["herd_code_choice", "herd_code_next", "herd_code_files", "herd_arithmetic"]


def _same_scores(ours: dict, theirs: dict, tasks: list[str]):
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        metrics = [k for k, v in a.items() if isinstance(v, float) and "stderr" not in k]
        assert metrics, task
        for k in metrics:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (task, k, a[k], b[k])
        for x, y in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert x["doc_id"] == y["doc_id"]
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                rx, ry = rx[0], ry[0]
                if isinstance(rx, str):
                    assert rx == ry, task
                elif isinstance(rx, tuple | list):  # (loglikelihood, greedy)
                    assert math.isclose(rx[0], ry[0], rel_tol=1e-4, abs_tol=1e-4) and rx[1] == ry[1], (task, rx, ry)
                else:  # a rolling loglikelihood
                    assert math.isclose(rx, ry, rel_tol=1e-5), (task, rx, ry)


QUICK = [(["herd_code_next"], True)]
EVERY_KIND = [(["herd_code_choice", "herd_code_next", "herd_arithmetic"], True), (["herd_code_files"], False)]


@pytest.mark.parametrize("runs", [QUICK, pytest.param(EVERY_KIND, marks=pytest.mark.slow)], ids=["quick", "every-kind"])
def test_herd_serve_through_local_completions_gives_the_same_scores(run_dir, monkeypatch, runs):  # noqa: F811
    """The shipped offline tasks (every request type: multiple choice, loglikelihood with its greedy
    flag, rolling loglikelihood, generate-until) scored by the in-process `herd` model and by lm-eval's
    own `local-completions` client against `herd serve` on 127.0.0.1: the same scores, document by
    document. Both see the same tokens: local-completions tokenizes with the checkpoint's tokenizer
    files through transformers, and its max_length counts two more tokens than herd's (its input
    includes the last target and the one token it generates). begin-of-text: herd's default
    (add_bos_token) for contexts; for rolling loglikelihood lm-eval puts it before the text as well
    as the window's prefix, so that task runs with add_bos_token false on both sides. The quick variant
    runs the loglikelihood task only."""
    pytest.importorskip("fastapi")
    pytest.importorskip("transformers")
    pytest.importorskip("tenacity", reason="local-completions needs lm-eval's api extra: pip install 'lm-eval[api]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from herd.inference.session import load_model_and_tokenizer
    from herd.serve.app import ServeConfig, create_app
    from tests.test_serve import Server

    path, window, new = str(run_dir / "model"), 96, 8
    manager = TaskManager(include_path=str(TASKS_DIR))
    ours = [simple_evaluate(model="herd", model_args={"pretrained": path, "max_length": window, "max_gen_toks": new,
                                                      "batch_size": 4, "add_bos_token": bos},
                            tasks=tasks, task_manager=manager, log_samples=True) for tasks, bos in runs]
    model, tok = load_model_and_tokenizer(path)
    with Server(create_app(model, tok, ServeConfig(model_name="tiny"))) as server:
        theirs = [simple_evaluate(model="local-completions", model_args={
            "base_url": server.url + "/v1/completions", "model": "tiny", "tokenizer": path,
            "tokenizer_backend": "huggingface", "add_bos_token": bos, "max_length": window + 2, "max_gen_toks": new,
            "max_retries": 1}, tasks=tasks, task_manager=manager, log_samples=True) for tasks, bos in runs]
    for (tasks, _), a, b in zip(runs, ours, theirs):
        _same_scores(a, b, tasks)
    # the tasks measured something: a tiny random model's next lines are never all greedy
    assert {s["resps"][0][0][1] for s in ours[0]["samples"]["herd_code_next"]} == {False}


def test_registering_herd_keeps_lm_evals_own_model_types():
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"
