"""iRoPE against RoPE on every layer, and against iRoPE without inference-time temperature scaling:
NLL by position and needle accuracy at 1x, 4x and 16x the training length (issue 14; SPEC 2.1).

    python experiments/irope_ablation.py [--steps 200] [--seeds 0,1] [--out docs/ablations]

Three models per seed, equal compute (the same data, steps, batch and width; the NoPE layer costs
what a RoPE layer costs):
- irope: chunked-attention RoPE layers (chunk 32) and a global NoPE layer every 4th, with the
  NoPE layers' query temperature 1 + 0.1 ln(1 + floor((p + 1) / 128)), 1 at every training
  position but the last (floor_scale = the training length, as Llama 4's 8192 is its chunk and
  first training length): a scaling for inference past the training length;
- irope, no temperature: the same trained weights, evaluated with the temperature switched off;
- rope everywhere: RoPE on every layer with global attention (a Llama 3 style model).
Trained on the stdlib's training split at 128 tokens; evaluated on the validation split's longest
files: mean NLL of the tokens in (0, 128], (128, 512], (512, 2048], and the needle grid (exact
match and the likelihood variant, 4 distractors) at 128, 512 and 2048 tokens, three depths.
Prints a markdown table and writes a plot of the cumulative NLL by position.
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
from herd.eval.needle import filler_lines, run_needle
from herd.eval.plots import plot_nll_by_position
from herd.eval.position import cumulative_average, fit_power_law, nll_by_position
from herd.model import Llama4
from herd.tokenizer import train_tokenizer
from herd.train.config import TrainConfig
from herd.train.loop import train
from herd.train.losses import causal_lm_loss

SEQ, CHUNK = 128, 32
LENGTHS = (SEQ, 4 * SEQ, 16 * SEQ)


def model_config(variant: str, tok) -> ModelConfig:
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=192, intermediate_size_mlp=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      rope_theta=10000.0, attention_chunk_size=CHUNK, floor_scale=SEQ, num_local_experts=4,
                      interleave_moe_layer_step=2, max_position_embeddings=4 * LENGTHS[-1],
                      bos_token_id=tok.bos_id, eos_token_id=tok.end_of_text_id, pad_token_id=tok.pad_id)
    if variant == "rope everywhere":  # no NoPE layer, and global attention (a chunk longer than any input)
        text = dataclasses.replace(text, nope_layers=[], attention_chunk_size=8 * LENGTHS[-1])
    return ModelConfig(text=text, vision=None)


def without_temperature(model: Llama4) -> Llama4:
    for module in model.modules():
        if hasattr(module, "temperature"):
            module.temperature = None
    return model


def evaluate(model: Llama4, tok, docs: list[list[int]], lines) -> dict:
    model.eval()
    with torch.no_grad():
        nll = nll_by_position(model, docs, LENGTHS[-1])
    bounds = (0,) + LENGTHS
    spans = {f"{a + 1}-{b}": float(nll[a:b - 1].mean()) for a, b in zip(bounds, bounds[1:])}
    needle = run_needle(model, tok, lines, LENGTHS, (0.0, 0.5, 1.0), trials=2, distractors=4)
    per_length = lambda grid: [float(np.mean([row[j] for row in grid])) for j in range(len(LENGTHS))]  # noqa: E731
    return {"nll": nll, "spans": spans, "exact": per_length(needle["exact_match"]),
            "top1": per_length(needle["likelihood_top1"]), "rank": per_length(needle["mean_rank"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="docs/ablations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=400_000)], num_bpe_ranks=1024)
    train_docs = text_documents([d.text for d in stdlib_texts("train", max_bytes=2_000_000)], tok)
    held = [d.text for d in stdlib_texts("validation")]
    long_docs = [ids for ids in (tok.encode(t[:16 * LENGTHS[-1]], bos=True) for t in sorted(held, key=len)[-24:])
                 if len(ids) >= LENGTHS[-1]][:8]
    lines = filler_lines(tok, held[::7][:60])
    results: dict[str, list[dict]] = {}
    for seed in map(int, args.seeds.split(",")):
        for variant in ("irope", "rope everywhere"):
            torch.manual_seed(seed)
            model = Llama4(model_config(variant, tok))
            cfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=SEQ, lr=3e-3, warmup_steps=20, seed=seed,
                              log_every=50, eval_every=10**6, ckpt_every=10**6, progress=False)
            loader = PackedLoader(train_docs, seq_len=SEQ, batch_size=8, pad_id=tok.pad_id, seed=seed)
            start = time.process_time()
            with tempfile.TemporaryDirectory() as tmp:
                done = train(model, cfg, loader, causal_lm_loss, tmp)
            print(f"seed {seed} {variant}: trained, loss {done.loss:.3f}, {time.process_time() - start:.0f} s CPU",
                  flush=True)
            evals = {variant: evaluate(model, tok, long_docs, lines)}
            if variant == "irope":
                evals["irope, no temperature"] = evaluate(without_temperature(model), tok, long_docs, lines)
            for name, r in evals.items():
                r["train_loss"] = float(done.loss)
                results.setdefault(name, []).append(r)
                print(f"seed {seed} {name}: {json.dumps({k: v for k, v in r.items() if k != 'nll'})}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: np.mean([cumulative_average(r["nll"]) for r in rs], 0) for name, rs in results.items()}
    plot_nll_by_position(curves, {n: fit_power_law(c) for n, c in curves.items()},
                         {"training length": SEQ, "RoPE chunk": CHUNK}, out / "irope_nll_by_position.png")
    seeds = len(next(iter(results.values())))
    print(f"\n{args.steps} steps x 8 x {SEQ} tokens per model, {seeds} seed(s) (mean, and the range over seeds); "
          f"CPU time {time.process_time() - cpu0:.0f} s\n")
    spans = list(next(iter(results.values()))[0]["spans"])
    print("| model | final train loss | " + " | ".join(f"NLL {s}" for s in spans) + " | "
          + " | ".join(f"needle top-1 @{n}" for n in LENGTHS) + " | " + " | ".join(f"exact @{n}" for n in LENGTHS) + " |")
    print("|---|" + "---|" * (1 + len(spans) + 2 * len(LENGTHS)))
    fmt = lambda xs, f: f.format(np.mean(xs)) + (f" ({f.format(min(xs))}-{f.format(max(xs))})" if len(xs) > 1 else "")  # noqa: E731
    for name, rs in results.items():
        cells = [fmt([r["train_loss"] for r in rs], "{:.3f}")]
        cells += [fmt([r["spans"][s] for r in rs], "{:.3f}") for s in spans]
        cells += [fmt([r["top1"][j] for r in rs], "{:.0%}") for j in range(len(LENGTHS))]
        cells += [fmt([r["exact"][j] for r in rs], "{:.0%}") for j in range(len(LENGTHS))]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
