"""MoE against dense, at equal active parameters and at equal total parameters (issue 14; SPEC 2.2).

    python experiments/moe_dense_ablation.py [--steps 400] [--seeds 0,1] [--out docs/ablations]
    python experiments/moe_dense_ablation.py --plot-only docs/ablations/moe_dense.json

Three text decoders of 4 layers, width 96, the same attention (iRoPE, chunk 32), the same data,
steps and batch (8 x 128 tokens of the stdlib's training split, BPE with 1,024 ranks):
- moe: Llama 4's layout, MoE on every other layer (16 routed experts of width 64, top-1, plus a
  shared expert of width 64) and dense SwiGLU layers of width 128 between them: every layer's
  active feed-forward width is 128;
- dense, equal active: every layer dense, width 128: the same active parameters and FLOPs per
  token as the MoE model (less its router);
- dense, equal total: every layer dense and as wide as makes the total parameters equal the MoE
  model's (about twice the parameters, and FLOPs, per token of the other two).
Scored on held-out code (the validation split): loss per token and bits per byte, in windows of
the training length. Prints a markdown table (mean over seeds, and the range), saves the per-seed
results as moe_dense.json and plots the held-out loss per model and seed (moe_dense.png) in --out;
--plot-only redraws the plot from such a JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from herd.config import ModelConfig, TextConfig
from herd.data.corpora import stdlib_texts
from herd.data.datasets import text_documents
from herd.data.packing import PackedLoader
from herd.eval.perplexity import score_texts
from herd.model import Llama4
from herd.tokenizer import train_tokenizer
from herd.train.config import TrainConfig
from herd.train.loop import train
from herd.train.losses import causal_lm_loss

SEQ, EXPERT = 128, 64


def text_config(tok, **kw) -> TextConfig:
    return TextConfig(vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=EXPERT,
                      intermediate_size_mlp=2 * EXPERT, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, rope_theta=10000.0, attention_chunk_size=32,
                      floor_scale=SEQ, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=2,
                      max_position_embeddings=4 * SEQ, bos_token_id=tok.bos_id, eos_token_id=tok.end_of_text_id,
                      pad_token_id=tok.pad_id, **kw)


def variants(tok) -> dict[str, ModelConfig]:
    moe = text_config(tok)
    total = Llama4(ModelConfig(text=moe, vision=None)).num_parameters()
    dense = dataclasses.replace(moe, moe_layers=[])
    # the widest dense model whose total parameters do not pass the MoE model's (width in steps of 8)
    width = 2 * EXPERT
    while Llama4(ModelConfig(text=dataclasses.replace(dense, intermediate_size_mlp=width + 8), vision=None)
                 ).num_parameters() <= total:
        width += 8
    return {"moe (16 experts top-1 + shared, every 2nd layer)": moe, "dense, equal active": dense,
            f"dense, equal total (width {width})": dataclasses.replace(dense, intermediate_size_mlp=width)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="docs/ablations")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plot from a saved moe_dense.json")
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads(Path(args.plot_only).read_text())
        plot(saved["results"], saved["steps"], Path(args.plot_only).with_suffix(".png"))
        return
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=400_000)], num_bpe_ranks=1024)
    train_docs = text_documents([d.text for d in stdlib_texts("train", max_bytes=2_000_000)], tok)
    held = [d.text for d in stdlib_texts("validation")][::5][:40]
    results: dict[str, list[dict]] = {}
    params: dict[str, tuple[int, int]] = {}
    for seed in map(int, args.seeds.split(",")):
        for name, text in variants(tok).items():
            torch.manual_seed(seed)
            model = Llama4(ModelConfig(text=text, vision=None))
            routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
            active = model.num_parameters() - routed + routed // text.num_local_experts
            params[name] = (model.num_parameters(), active if text.moe_layers != [] else model.num_parameters())
            cfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=SEQ, lr=3e-3, warmup_steps=20, seed=seed,
                              log_every=50, eval_every=10**6, ckpt_every=10**6, progress=False)
            loader = PackedLoader(train_docs, seq_len=SEQ, batch_size=8, pad_id=tok.pad_id, seed=seed)
            start = time.process_time()
            with tempfile.TemporaryDirectory() as tmp:
                train(model, cfg, loader, causal_lm_loss, tmp)
            seconds = time.process_time() - start
            model.eval()
            with torch.no_grad():
                score = score_texts(model, lambda s: tok.encode(s, bos=True), held, SEQ).to_dict()
            results.setdefault(name, []).append({"loss": score["loss"], "bpb": score["bpb"], "cpu_s": seconds})
            print(f"seed {seed} {name}: held-out loss {score['loss']:.3f}, {score['bpb']:.3f} bits/byte, "
                  f"{seconds:.0f} s CPU to train", flush=True)
    seeds = len(next(iter(results.values())))
    print(f"\n{args.steps} steps x 8 x {SEQ} tokens per model, {seeds} seed(s); held-out: "
          f"{len(held)} validation files; total CPU time {time.process_time() - cpu0:.0f} s\n")
    print("| model | total params | active params | held-out loss (nats/token) | bits/byte | training CPU s |")
    print("|---|---|---|---|---|---|")
    fmt = lambda xs, f: f.format(np.mean(xs)) + (f" ({f.format(min(xs))}-{f.format(max(xs))})" if len(xs) > 1 else "")  # noqa: E731
    for name, rs in results.items():
        total, active = params[name]
        print(f"| {name} | {total:,} | {active:,} | {fmt([r['loss'] for r in rs], '{:.3f}')} | "
              f"{fmt([r['bpb'] for r in rs], '{:.3f}')} | {fmt([r['cpu_s'] for r in rs], '{:.0f}')} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_dense.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=1))
    plot(results, args.steps, out / "moe_dense.png")


def plot(results: dict[str, list[dict]], steps: int, path: Path) -> None:
    """Held-out loss per model: each seed a dot, the mean a bar, the seeds' range a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, rs) in enumerate(results.items()):
        losses = [r["loss"] for r in rs]
        ax.barh(i, np.mean(losses), color=f"C{i}", alpha=0.6)
        ax.plot([min(losses), max(losses)], [i, i], "k-", lw=1)
        for seed, loss in enumerate(losses):
            ax.plot(loss, i, "ko", ms=5)
            ax.annotate(f"seed {seed}", (loss, i), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.set_yticks(range(len(results)), [name.replace(" (", "\n(") for name in results], fontsize=8)
    everything = [r["loss"] for rs in results.values() for r in rs]
    ax.set_xlim(min(everything) - 0.1, max(everything) + 0.05)  # the gaps are small: start the axis near them
    ax.set_xlabel("held-out loss (nats/token), lower is better")
    ax.set_title(f"MoE against dense after {steps} steps: bars = mean, dots = seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
