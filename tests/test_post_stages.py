"""Post-training stages as recipes through `herd train`'s machinery, at smoke scale."""

import dataclasses
import json
import math

from herd.pipeline import run
from herd.train.config import smoke


def smoke_cfg(out, **changes):
    cfg = smoke()
    return dataclasses.replace(cfg, out=str(out), train=dataclasses.replace(cfg.train, steps=2), **changes)


def records(out, stage, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and r["kind"] == kind]


def test_sft_tags_drops_trains_and_reports_accuracy(tmp_path, capsys):
    # Every code instruction is easy (its loss is below 100 nats); no task prompt is (the smoke
    # model never answers all its samples right), so the dropped fraction is the code's share.
    cfg = smoke_cfg(tmp_path, easy_loss=100.0, easy_pass_rate=1.0, answer_tokens=8, post_eval_problems=2)
    summary = run(cfg, stages=("text", "sft"))
    assert "[sft] difficulty tags: dropped" in capsys.readouterr().out
    result = summary["stages"]["sft"]
    tasks = ["letters", "arithmetic", "scenes"]
    for task in tasks:
        assert 0 <= result[task] <= 1 and 0 <= result[f"{task}_format"] <= 1
    assert result["dropped_easy_code"] == 1 and result["dropped_easy_tasks"] == 0
    assert 0 < result["dropped_easy"] < 1
    evals = records(tmp_path, "sft", "eval")
    assert evals and all(t in evals[-1] for t in tasks) and "dropped_easy" in evals[-1]
    trains = records(tmp_path, "sft", "train")
    assert len(trains) == cfg.sft_steps and all(math.isfinite(r["loss"]) for r in trains)
    assert set(summary["task_accuracy"]) == {"pretrained", "sft"}
    assert set(summary["task_accuracy"]["pretrained"]) == set(summary["task_accuracy"]["sft"]) >= set(tasks)
