"""Codistillation at tiny scale: does a student learn more from a teacher than from the data alone?

    python experiments/codistill.py [--teacher_steps 100] [--steps 70] [--width 256]

Trains a teacher (the `tiny` text decoder made wider: hidden `--width` instead of 128), then the
same `tiny` student three times from the same initialisation, on the same batches for the same
number of steps: from scratch (cross-entropy), distilled with a fixed soft-target weight, and
distilled with herd's dynamic weight (herd/train/distill.py: a schedule over training times the
teacher's confidence per token). Data: Python standard library code, a small BPE tokenizer;
evaluation on held-out stdlib files (validation split). Prints the table in docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from herd.config import ModelConfig
from herd.data.corpora import stdlib_texts
from herd.data.datasets import text_documents
from herd.data.packing import PackedLoader
from herd.model import Llama4
from herd.presets import tiny
from herd.tokenizer import train_tokenizer
from herd.train.config import TrainConfig
from herd.train.distill import DistillationLoss
from herd.eval import LMEvaluator, token_byte_lengths
from herd.train.loop import train
from herd.train.losses import causal_lm_loss
from herd.train.metrics import read_metrics

BATCH, SEQ = 8, 128


def model(tokenizer, width: int = 128, seed: int = 0) -> Llama4:
    text = dataclasses.replace(tiny().text, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.end_of_text_id, pad_token_id=tokenizer.pad_id,
                               hidden_size=width, intermediate_size=2 * width, intermediate_size_mlp=4 * width,
                               num_attention_heads=width // 32, num_key_value_heads=max(1, width // 64))
    torch.manual_seed(seed)
    return Llama4(ModelConfig(text=text, vision=None))


def run(name, m, steps, loss_fn, docs, evaluator, lr) -> dict:
    cfg = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, lr=lr, warmup_steps=min(30, steps // 5),
                      log_every=10, eval_every=10**6, ckpt_every=10**6, progress=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # seed 0 for every run: the same batches in the same order
        data = PackedLoader(docs, seq_len=SEQ, batch_size=BATCH, pad_id=m.config.text.pad_token_id, seed=0)
        result = train(m, cfg, data, loss_fn, tmp, evaluate=evaluator)
        last = max((r for r in read_metrics(Path(tmp) / "metrics.jsonl") if r["kind"] == "train"),
                   key=lambda r: r["step"])
    row = {"name": name, **result.eval, "minutes": (time.perf_counter() - start) / 60,
           "soft_weight": last.get("soft_weight")}
    print(f"  {name}: held-out loss {row['loss']:.3f}, {row['bpb']:.3f} bits/byte ({row['minutes']:.1f} min)"
          + (f", last soft weight {row['soft_weight']:.2f}" if row["soft_weight"] is not None else ""), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher_steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=70, help="student steps (every student run)")
    parser.add_argument("--width", type=int, default=256, help="teacher hidden size (the student's is 128)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.5, help="fixed soft-target weight")
    parser.add_argument("--dynamic", default="0.9,0.3", help="dynamic: scheduled weight at the first,last step")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--train_bytes", type=int, default=2_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # on a shared, oversubscribed CPU two threads wait on each other: 5x slower

    texts = [d.text for d in stdlib_texts("train", max_bytes=args.train_bytes)]
    held_out = [d.text for d in stdlib_texts("validation", max_bytes=400_000)]
    tokenizer = train_tokenizer(texts[: len(texts) // 2], num_bpe_ranks=1024)
    docs = text_documents(texts, tokenizer)
    val = PackedLoader(text_documents(held_out, tokenizer), seq_len=SEQ, batch_size=BATCH, pad_id=tokenizer.pad_id,
                       seed=1)
    evaluator = LMEvaluator([next(val) for _ in range(16)], token_byte_lengths(tokenizer))
    print(f"{sum(map(len, docs)):,} training tokens; student {BATCH * SEQ * args.steps:,} tokens, teacher "
          f"{BATCH * SEQ * args.teacher_steps:,}", flush=True)

    teacher = model(tokenizer, args.width, seed=1)
    rows = [run(f"teacher (width {args.width}, {args.teacher_steps} steps)", teacher, args.teacher_steps,
                causal_lm_loss, docs, evaluator, args.lr)]
    rows.append(run("student from scratch", model(tokenizer), args.steps, causal_lm_loss, docs, evaluator, args.lr))
    fixed = DistillationLoss(teacher, temperature=args.temperature, weighting="fixed", alpha=args.alpha)
    rows.append(run(f"student distilled, fixed weight {args.alpha}", model(tokenizer), args.steps, fixed, docs,
                    evaluator, args.lr))
    start, end = (float(x) for x in args.dynamic.split(","))
    dynamic = DistillationLoss(teacher, temperature=args.temperature, weighting="dynamic", alpha=start, alpha_end=end)
    rows.append(run(f"student distilled, dynamic weight ({dynamic.alpha} -> {dynamic.alpha_end}) x confidence",
                    model(tokenizer), args.steps, dynamic, docs, evaluator, args.lr))

    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"\nteacher {params(teacher):.2f}M parameters, student {params(model(tokenizer)):.2f}M; "
          f"held-out stdlib code, {BATCH}x{SEQ} tokens per step\n")
    print("| model | held-out loss (nats/token) | bits/byte | minutes |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['loss']:.3f} | {r['bpb']:.3f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
