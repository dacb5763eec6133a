"""Post-training stages as recipes through `herd train`'s machinery, at smoke scale."""

import dataclasses
import json
import math

import pytest

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


def test_dpo_starts_at_log_2_against_its_frozen_reference(tmp_path, capsys):
    cfg = smoke_cfg(tmp_path, answer_tokens=8, post_eval_problems=2)
    summary = run(cfg, stages=("text", "dpo"))
    assert "[dpo]" in capsys.readouterr().out and summary["stages"]["dpo"]["pairs"] > 0
    trains = records(tmp_path, "dpo", "train")
    assert len(trains) == cfg.dpo_steps
    first = trains[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its reference at step 0
    assert first["reward_margin"] == pytest.approx(0, abs=1e-5)
    for key in ("reward_chosen", "reward_rejected", "reward_accuracy", "dpo_loss"):
        assert all(key in r for r in trains)
    assert any(r["loss"] != first["loss"] for r in trains[1:])  # the policy moved away from the reference
    # the reference is read, never saved: the checkpoint holds exactly the policy's weights
    ckpt = sorted((tmp_path / "checkpoints" / "dpo").iterdir())[-1]
    assert tensor_names(ckpt) == tensor_names(tmp_path / "model")
    assert set(summary["task_accuracy"]) == {"pretrained", "dpo"}


def tensor_names(folder):
    from safetensors import safe_open

    names = set()
    for f in folder.rglob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    assert names, f"no safetensors under {folder}"
    return names


def test_herd_train_post_trains_keeps_the_base_and_reports_accuracy_per_stage(tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = smoke_cfg(tmp_path, answer_tokens=8, post_eval_problems=2)
    summary = run(cfg, stages=("text", "sft", "dpo"))
    assert list(summary["task_accuracy"]) == ["pretrained", "sft", "dpo"]
    base, final = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("base", "model"))
    assert base.keys() == final.keys()
    assert any(not torch.equal(base[k], final[k]) for k in base)  # model/ is post-trained, base/ is not
    assert (tmp_path / "base" / "tokenizer.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert "held-out accuracy per task" in report
    for row in ("| pretrained |", "| sft |", "| dpo |"):
        assert row in report
    assert "SFT dropped" in report
