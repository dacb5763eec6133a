"""Post-training stages as recipes through `herd train`'s machinery, at smoke scale."""

import dataclasses
import json
import math

import pytest
import torch

from herd.chat import render_chat
from herd.pipeline import run
from herd.tasks import Score, get_task
from herd.train.config import smoke


def smoke_cfg(out, **changes):
    cfg = smoke()
    return dataclasses.replace(cfg, out=str(out), train=dataclasses.replace(cfg.train, steps=2), **changes)


def records(out, stage, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and r["kind"] == kind]


def test_sft_tags_drops_trains_and_reports_accuracy(tmp_path, capsys, monkeypatch):
    # Every code instruction is easy (its loss is below 100 nats); no task prompt is (the smoke
    # model never answers all its samples right) and all are kept (sft_keep=1), so the dropped
    # fraction is the code's share.
    from herd.model.moe import MoE
    from herd.train.recipes import Run

    biased = []  # post-training measures (and trains) the reference forward that the checkpoints hold
    measure = Run.task_eval
    monkeypatch.setattr(Run, "task_eval", lambda self, model, *a, **k: biased.append(any(
        m.selection_bias is not None for m in model.modules() if isinstance(m, MoE))) or measure(self, model, *a, **k))
    cfg = smoke_cfg(tmp_path, easy_loss=100.0, easy_pass_rate=1.0, sft_keep=1.0, answer_tokens=8,
                    post_eval_problems=2)
    assert cfg.train.balance == "bias"  # the text stage steers its experts with selection biases
    summary = run(cfg, stages=("text", "sft"))
    assert biased == [False, False] and "final_code_with_selection_bias" not in summary
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
    assert set(tasks) <= set(summary["task_accuracy"]["pretrained"]) <= set(summary["task_accuracy"]["sft"])


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
    # the sampled measures (post_eval_samples answers per problem): accuracy and tidy, stopped answers
    assert cfg.post_eval_samples >= 2 and "letters, sampled" in report
    for stage, acc in summary["task_accuracy"].items():
        for task in ("letters", "arithmetic", "scenes"):
            if stage == "pretrained":  # the base is measured greedy only: it cannot chat yet
                assert f"{task}_sampled" not in acc
            else:
                assert 0 <= acc[f"{task}_sampled"] <= 1 and 0 <= acc[f"{task}_sampled_format"] <= 1
    base_row = next(line for line in report.splitlines() if line.startswith("| pretrained |"))
    assert base_row.endswith(" | – |")


# ------------------------------------------------------------------------------------------------
# Online RL
# ------------------------------------------------------------------------------------------------

RL_METRICS = ("reward", "accuracy", "format", "zero_advantage_groups", "kl", "entropy", "clip_fraction",
              "completion_tokens", "draws", "pool", "pool_pass_rate")


def test_rl_stage_runs_logs_its_metrics_and_records_accuracy(tmp_path):
    cfg = smoke_cfg(tmp_path, answer_tokens=8, post_eval_problems=2)
    summary = run(cfg, stages=("text", "rl"))
    trains = records(tmp_path, "rl", "train")
    assert len(trains) == cfg.rl_steps
    for r in trains:
        assert all(math.isfinite(r[key]) for key in ("loss", *RL_METRICS)), r
        assert 0 <= r["zero_advantage_groups"] <= 1 and 1 <= r["draws"] <= cfg.rl_max_attempts
        assert r["kl"] == pytest.approx(0, abs=1e-3) or r["step"] > 1  # the policy starts as its reference
    assert records(tmp_path, "rl", "eval")
    assert set(summary["task_accuracy"]) == {"pretrained", "rl"}
    assert set(summary["task_accuracy"]["rl"]) >= {"letters", "arithmetic", "scenes"}
    assert (tmp_path / "base").is_dir()  # rl is post-training: the base is kept before it


from tests.test_post_losses import Lucky, chat_model  # noqa: E402,F401  (a tiny chat model, a checker that varies)


class Fixed(Lucky):
    """Lucky on the problems named in `varied`; every other problem always scores 0: all-equal groups."""

    def __init__(self, varied):
        self.varied = set(varied)

    def check(self, problem, completion, *, stopped=True):
        return super().check(problem, completion, stopped=stopped) if problem.key in self.varied else Score(0.0, 0.0)


def online(chat_model, problems, checker, **changes):
    from herd.train.online_rl import OnlineRollouts

    tok, model, _ = chat_model
    kwargs = dict(prompts=2, group_size=4, max_new_tokens=6, refilter_every=100, max_attempts=20, seed=0,
                  tasks={"arithmetic": checker}) | changes
    return OnlineRollouts(model, tok, problems, **kwargs)


def test_rl_drops_all_equal_groups_and_refills_the_batch(chat_model):
    problems = get_task("arithmetic").problems("train", 8)
    varied = {p.key for p in problems[:3]}
    prompt_ids = {p.key: render_chat(p.messages(), chat_model[0], add_generation_prompt=True).ids for p in problems}
    data = online(chat_model, problems, Fixed(varied), window=(-1.0, 2.0))  # the curriculum keeps everything
    for _ in range(2):
        batch = next(data)
        groups = batch.advantages.view(-1, 4)
        assert len(groups) == 2 and (groups.abs().sum(1) > 0).all()  # a full batch, every group with signal
        dropped, sampled = batch.metrics["zero_advantage_groups"]
        assert sampled == 2 * batch.metrics["draws"][0] and dropped >= sampled - 2 > 0  # refilled after drops
        assert len(data.pool) == 8
        rows = batch.batch.input_ids.tolist()
        asked = {key for key, ids in prompt_ids.items() for r in rows if r[:len(ids)] == ids}
        assert len(asked) == 2 and asked <= varied  # only problems whose groups vary are trained on
    # with no group worth training on, a batch is still returned after max_attempts draws: zero advantages
    nothing = online(chat_model, problems, Fixed(set()), window=(-1.0, 2.0), max_attempts=3)
    batch = next(nothing)
    assert batch.metrics["draws"] == (3.0, 1) and (batch.advantages == 0).all()
    assert batch.metrics["zero_advantage_groups"] == (6.0, 6.0)


def test_rl_refilters_the_pool_to_medium_to_hard_prompts(chat_model):
    problems = get_task("arithmetic").problems("train", 8)
    varied = {p.key for p in problems[:4]}
    data = online(chat_model, problems, Fixed(varied), refilter_every=2)
    refilters = []
    refilter = data.refilter
    data.refilter = lambda: (refilters.append(data.batches), refilter())
    next(data)
    # pass rate 0 (never right) is out; the varied ones stay unless all 4 samples happened to agree
    assert data.pool and set(data.pool) <= {0, 1, 2, 3}
    assert next(data).metrics["pool"] == (len(data.pool), 1)
    next(data)
    assert refilters == [0, 2]  # before the first batch, then every 2


def test_rl_fresh_candidates_each_refiltering_round(chat_model):
    """With a function of the round, each re-filtering scores new problems and the pool indexes
    them; a round that keeps too few leaves the previous candidates and pool in place."""
    task = get_task("arithmetic")
    rounds = {r: task.problems("train", 8, seed=r) for r in range(3)}
    asked = []

    def candidates(round):
        asked.append(round)
        return rounds[round]

    varied = {p.key for p in rounds[0][:4] + rounds[1][:4]}  # round 2 is all-zero: nothing in the window
    data = online(chat_model, candidates, Fixed(varied), refilter_every=1)
    pools = []
    for _ in range(3):
        next(data)
        pools.append([data.candidates[i].key for i in data.pool])
    assert asked == [0, 1, 2]  # round 0 built once, up front
    assert set(pools[0]) <= {p.key for p in rounds[0][:4]} and set(pools[1]) <= {p.key for p in rounds[1][:4]}
    assert pools[2] == pools[1] and data.pool_round == 1 and data.rounds == 3


@pytest.mark.parametrize("fresh", [False, True])
def test_rl_resumed_from_a_checkpoint_continues_with_the_same_losses(chat_model, tmp_path, fresh):
    """Interrupted after step 4, whose state has the pool of the second re-filtering (at step 4):
    with fresh candidates, a resumed run must rebuild that round's candidates to draw step 5."""
    import copy
    import shutil

    from herd.train.checkpoint import step_dirs
    from herd.train.config import TrainConfig
    from herd.train.loop import train
    from herd.train.post_losses import GRPOLoss

    task = get_task("arithmetic")
    problems = (lambda round: task.problems("train", 6, seed=round)) if fresh else task.problems("train", 6)
    cfg = TrainConfig(steps=6, batch_size=1, lr=1e-2, warmup_steps=1, ckpt_every=4, eval_every=100, log_every=1,
                      progress=False, balance="none")

    def fit(out):
        tok, model, processor = chat_model
        policy = copy.deepcopy(model)
        data = online((tok, policy, processor), problems, Lucky(), refilter_every=3, window=(-1.0, 2.0))
        train(policy, cfg, data, GRPOLoss(reference=copy.deepcopy(model)), out, stage="rl")
        return [(r["step"], r["loss"], r["grad_norm"], r["kl"]) for r in map(json.loads, (out / "metrics.jsonl")
                                                                              .read_text().splitlines())]

    whole = fit(tmp_path / "a")
    assert len(whole) == 6 and any(loss != 0 for _, loss, _, _ in whole) and whole[-1][3] > 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(step_dirs(tmp_path / "b" / "checkpoints" / "rl")[-1])  # interrupted after step 4
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    resumed = fit(tmp_path / "b")
    assert [r[0] for r in resumed] == [5, 6]
    for (_, *a), (_, *b) in zip(whole[4:], resumed):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_post_training_alone_on_a_checkpoint_with_the_users_data(tmp_path, capsys):
    """`herd train --init=CKPT --stages=sft,dpo --sft_data=my.jsonl --dpo_data=my.jsonl`: a given
    checkpoint post-trained on the user's conversations and preference pairs (bad records skipped
    with a warning), kept as base/ beside model/."""
    from safetensors.torch import load_file

    from herd.cli import main
    from herd.data.corpora import stdlib_texts
    from herd.model import Llama4
    from herd.pipeline import model_config_for
    from herd.tokenizer import train_tokenizer
    from herd.train.checkpoint import save_model

    ckpt = tmp_path / "ckpt"
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=100_000)], num_bpe_ranks=300)
    save_model(Llama4(model_config_for("tiny", tok)), ckpt)
    tok.save(ckpt)
    lines = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]}
             for i in range(12)]
    lines += [{"prompt": "Name a colour.", "completion": "Red."}, {"messages": [{"content": "no role"}]}]
    lines += [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
               "rejected": "no" if i % 2 == 0 else "yes"} for i in range(5)]
    data = tmp_path / "my.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "smoke", f"--out={out}", f"--init={ckpt}", "--stages=sft,dpo", f"--sft_data={data}",
                 f"--dpo_data={data}", "--easy_loss=0", "--sft_keep=1", "--answer_tokens=8", "--post_eval_problems=2"]) == 0
    printed = capsys.readouterr()
    assert f"13 conversations of {data}" in printed.out and "training on 13 conversations" in printed.out
    assert f"[dpo] 5 preference pairs, from {data}" in printed.out
    assert "my.jsonl:14" in printed.err  # the bad record, named by file and line
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "dpo"] and list(summary["task_accuracy"]) == ["pretrained", "sft", "dpo"]
    assert records(out, "dpo", "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    start, base, final = (load_file(next(d.glob("*.safetensors"))) for d in (ckpt, out / "base", out / "model"))
    assert all(torch.equal(start[k], base[k]) for k in start)  # base/ is the checkpoint it started from
    assert any(not torch.equal(start[k], final[k]) for k in start)
    assert (out / "model" / "tokenizer.json").read_text() == (ckpt / "tokenizer.json").read_text()
