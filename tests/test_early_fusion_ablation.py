"""experiments/early_fusion_ablation.py compares like with like: its adapter-only stage trains only
the vision tower and projector, for the joint stage's steps, on the joint stage's caption rows."""

import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from herd.data.corpora import stdlib_texts
from herd.data.documents import Document
from herd.presets import tiny
from herd.tokenizer import train_tokenizer
from herd.train.config import smoke
from herd.train.recipes import Run, joint

ROOT = Path(__file__).resolve().parents[1]


def load_experiment():
    spec = importlib.util.spec_from_file_location("early_fusion_ablation",
                                                  ROOT / "experiments" / "early_fusion_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapter_only_matches_the_joint_stage_in_steps_and_caption_rows(tmp_path):
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=30_000)], num_bpe_ranks=300)
    cfg = dataclasses.replace(smoke(), images=12, clips=3, joint_steps=7)
    code = [Document.from_ids(tok.encode("x = 1\n" * 40, bos=True, eos=True), tok)]
    run = Run(cfg, tmp_path, tok, SimpleNamespace(config=tiny()), code, [], 1.0)
    fused, frozen = joint(run), load_experiment().adapter_only(run)
    assert fused.trainable == ("",) and frozen.trainable == ("vision.", "projector.")
    assert frozen.config.steps == fused.config.steps == 7
    captions = fused.data.loaders[1]
    for _ in range(3):  # the same caption rows, step by step
        a, b = next(captions), next(frozen.data)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.pixel_values, b.pixel_values)
