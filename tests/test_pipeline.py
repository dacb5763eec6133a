"""`herd train` end to end at smoke scale: every stage, the report, a checkpoint both herd and
transformers load, and a re-run that resumes instead of starting over."""

import json

import pytest
import torch

import herd
from herd.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "smoke", f"--out={out}"]) == 0
    return out


def test_the_run_leaves_a_report_and_learns(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["contrastive", "text", "align", "joint", "sft", "rl", "dpo"]
    assert list(summary["task_accuracy"]) == ["pretrained", "sft", "rl", "dpo"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    text = [r["loss"] for r in records if r["stage"] == "text" and r["kind"] == "train"]
    assert text[-1] < text[0]
    assert len(summary["nll_by_position"]) == summary["config"]["nll_len"] - 1
    assert summary["code_samples"] and summary["captions"]
    # captioning checks pretraining: it reads the base, not the chat model post-training made of it
    from herd.data.datasets import scene_documents
    from herd.data.images import ImageProcessor
    from herd.tokenizer import Tokenizer
    from herd.train.captions import generate_captions
    from herd.train.config import smoke
    from herd.train.recipes import HELDOUT_START

    tokenizer = Tokenizer.from_dir(run_dir / "model")
    heldout = scene_documents(tokenizer, ImageProcessor(tile_size=64, patch_size=8, max_tiles=1),
                              smoke().heldout_images, start=HELDOUT_START, seed=smoke().train.seed)
    with torch.no_grad():
        base = generate_captions(herd.from_pretrained(run_dir / "base"), heldout, tokenizer)
    assert [c["caption"] for c in summary["captions"]] == base
    report = (run_dir / "report.md").read_text()
    for plot in ("loss", "expert_load", "nll_by_position", "throughput", "rl"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in report
    # herd eval's section: its figures, beyond the training length (128 in smoke), and its own report
    assert "## Evaluation (`herd eval`)" in report and "bits per byte" in report and "R² =" in report
    for plot in summary["eval"]["plots"]:
        assert (run_dir / plot).stat().st_size > 1000 and plot in report
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["needle"]["lengths"] == [64, 128, 256] and results["position"]["length"] > 128
    assert (run_dir / "eval" / "report.md").exists()


def test_the_checkpoint_loads_in_herd_and_transformers(run_dir):
    transformers = pytest.importorskip("transformers")
    ours = herd.from_pretrained(run_dir / "model")
    theirs = transformers.Llama4ForConditionalGeneration.from_pretrained(run_dir / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
    ids = torch.tensor([tokenizer("def main():\n    return 1")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_a_rerun_resumes_every_stage(run_dir, capsys):
    capsys.readouterr()
    assert main(["train", "smoke", f"--out={run_dir}"]) == 0
    out = capsys.readouterr().out
    for stage in ("contrastive", "text", "align", "joint", "sft", "rl", "dpo"):
        assert f"[{stage}] resumed from" in out


def _check_learned(out):
    """Pretraining learned (the base model, kept before post-training) and SFT taught the tasks."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_code"]["loss"] < summary["unigram_loss"] - 1.0  # far below the unigram baseline
    assert (out / "report.md").exists() and (out / "model" / "model.safetensors").exists()
    assert (out / "base" / "model.safetensors").exists()
    accuracy = summary["task_accuracy"]
    tasks = [t for t in accuracy["pretrained"] if not t.endswith(("_format", "_sampled"))]
    assert sum(accuracy["sft"][t] for t in tasks) > sum(accuracy["pretrained"][t] for t in tasks)
    return summary


def test_quick_run_learns(tmp_path):
    """The README's main job at `--quick` scale: the same pipeline, about two minutes on 2 cores."""
    assert main(["train", "--quick", f"--out={tmp_path}"]) == 0
    _check_learned(tmp_path)


@pytest.mark.slow
def test_default_run_learns_code_and_captions(tmp_path):
    """The README's main job itself (about 14 minutes of pretraining and 6 of post-training on 2 quiet cores)."""
    assert main(["train", f"--out={tmp_path}"]) == 0
    summary = _check_learned(tmp_path)
    accuracy = summary["caption_accuracy"]
    assert accuracy["shape_precision"] > accuracy["shape_chance"]


def test_a_stage_written_outside_herd_runs_through_herd_train(tmp_path, capsys):
    """A recipe defined here (supervised fine-tuning of the head on conversations) goes through
    `herd train`'s machinery: its data is packed, only the renderer's loss mask is trained, only the
    weights it names learn, it is evaluated, logged, checkpointed, reported and resumed."""
    import dataclasses

    from herd.chat import render_chat
    from herd.data.documents import chat_document
    from herd.pipeline import run
    from herd.tokenizer import Tokenizer
    from herd.train.config import smoke
    from herd.train.losses import causal_lm_loss
    from herd.train.recipes import Stage

    seen = {}

    def sft(job):
        chats = [[{"role": "user", "content": f"What is {i} + {i}?"},
                  {"role": "assistant", "content": f"{2 * i}"}] for i in range(40)]
        docs = [chat_document(render_chat(c, job.tokenizer), job.tokenizer) for c in chats]
        data = job.loader(docs, batch_size=4, seed=0, whole_documents=True)
        seen["batch"] = data.batch_at(0, 0)
        seen["before"] = {n: p.detach().clone() for n, p in job.model.named_parameters()}
        return Stage("sft", job.stage_config(4, 1e-3, balance="none"), data, causal_lm_loss, ("lm_head.",),
                     evaluate=lambda m: {"answer_loss": causal_lm_loss(m, seen["batch"]).loss_sum.item()})

    cfg = smoke()
    cfg = dataclasses.replace(cfg, out=str(tmp_path), train=dataclasses.replace(cfg.train, steps=2))
    summary = run(cfg, stages=("text", sft))
    assert set(summary["stages"]) == {"text", "sft"} and "answer_loss" in summary["stages"]["sft"]
    tok = Tokenizer.from_dir(tmp_path / "model")
    labels = seen["batch"].labels
    trained = tok.decode(labels[labels != -100].tolist())
    assert "<|eot|>" in trained and set(trained.replace("<|eot|>", "")) <= set("0123456789")  # answers only
    model = herd.from_pretrained(tmp_path / "model")
    after = dict(model.named_parameters())
    for name, before in seen["before"].items():
        changed = not torch.equal(before, after[name])
        assert changed == name.startswith("lm_head."), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "sft" and r["kind"] == "eval" for r in records)
    capsys.readouterr()
    run(cfg, stages=("text", sft))
    assert "[sft] resumed from" in capsys.readouterr().out
