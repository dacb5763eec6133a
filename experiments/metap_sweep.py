"""MetaP: does the best learning rate stay put when the model gets 4x wider? (SPEC 6)

    python experiments/metap_sweep.py [--steps 150] [--lrs 1e-3,3e-3,1e-2,3e-2]

Sweeps the learning rate for a small MoE language model at two widths 4x apart (64 and 256; head
dim fixed, so heads grow with width), once with the standard parametrisation (every matrix
initialised N(0, 0.02), one learning rate) and once with MetaP (herd.train.metap, base shape =
the narrow model). Data: Python standard library code with a small BPE tokenizer. Prints the
mean training loss over the last 20 steps for each (width, lr) and marks the best lr per row;
the table in docs/training.md comes from this script.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from herd.config import ModelConfig, TextConfig
from herd.data.corpora import stdlib_texts
from herd.data.datasets import text_documents
from herd.data.packing import PackedLoader
from herd.model import Llama4
from herd.tokenizer import train_tokenizer
from herd.train.config import TrainConfig
from herd.train.loop import train
from herd.train.losses import causal_lm_loss
from herd.train.metap import metap_init_
from herd.train.metrics import read_metrics

BASE_WIDTH, DEPTH, HEAD_DIM = 64, 2, 32


def model_at(width: int, vocab: int, metap: bool) -> Llama4:
    text = TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                      intermediate_size_mlp=4 * width, num_hidden_layers=DEPTH, num_attention_heads=width // HEAD_DIM,
                      num_key_value_heads=max(1, width // HEAD_DIM // 2), head_dim=HEAD_DIM, attention_chunk_size=64,
                      floor_scale=64, num_local_experts=4, interleave_moe_layer_step=2, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = Llama4(ModelConfig(text=text, vision=None))
    if metap:
        metap_init_(model, BASE_WIDTH, DEPTH)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--widths", default="64,256")
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    widths = [int(x) for x in args.widths.split(",")]

    texts = [d.text for d in stdlib_texts("train", max_bytes=2_000_000)]
    tokenizer = train_tokenizer(texts[: len(texts) // 2], num_bpe_ranks=1024)
    docs = text_documents(texts, tokenizer)
    vocab = tokenizer.vocab_size

    rows = []
    for metap in (False, True):
        for width in widths:
            losses = []
            for lr in lrs:
                cfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=128, lr=lr, warmup_steps=15,
                                  balance="bias", metap=metap, base_width=BASE_WIDTH, base_depth=DEPTH,
                                  log_every=1, eval_every=10**6, ckpt_every=10**6, progress=False)
                with tempfile.TemporaryDirectory() as tmp:
                    train(model_at(width, vocab, metap), cfg, PackedLoader(docs, seq_len=128, batch_size=8, pad_id=tokenizer.pad_id), causal_lm_loss,
                          Path(tmp))
                    recs = [r for r in read_metrics(Path(tmp) / "metrics.jsonl") if r["kind"] == "train"]
                tail = [r["loss"] for r in sorted(recs, key=lambda r: r["step"])[-20:]]
                losses.append(statistics.mean(tail) if tail else float("nan"))
                print(f"  metap={metap} width={width} lr={lr:g}: {losses[-1]:.3f}", flush=True)
            rows.append(("MetaP" if metap else "standard", width, losses))

    print(f"\nmean training loss over the last 20 of {args.steps} steps (best lr in bold)\n")
    print("| parametrisation | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |")
    print("|---|---|" + "---|" * len(lrs) + "---|")
    for name, width, losses in rows:
        best = min(range(len(lrs)), key=lambda i: losses[i] if losses[i] == losses[i] else float("inf"))
        cells = [f"**{x:.3f}**" if i == best else f"{x:.3f}" for i, x in enumerate(losses)]
        print(f"| {name} | {width} | " + " | ".join(cells) + f" | {lrs[best]:g} |")


if __name__ == "__main__":
    main()
