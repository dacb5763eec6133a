"""Early fusion against image features fed only through the adapter to a frozen language model
(issue 14; SPEC 1 and 6).

    python experiments/early_fusion_ablation.py [--text-steps 150] [--steps 120] [--seeds 0,1] [--out docs/ablations]

One text model of the tiny preset is pretrained once (`herd train --quick`'s text stage: batch 8 x
256 tokens of stdlib code) and shared. Then, per seed, from that model with the same freshly
initialised vision tower (the seed's), the same number of steps of:
- early fusion: the `joint` recipe, all weights learn on a mixture of code rows (6 of 8) and
  captioned-scene rows (2 of 8), at the joint stage's learning rate;
- adapter only: the vision tower and projector learn, the language model frozen throughout (the
  `align` recipe's trainable set, at its learning rate), on the same 2 captioned-scene rows a step,
  in the same order: equal steps and equal caption rows.
Scored on the run's held-out scenes (never trained on): greedy captions, the share of the shapes
they name that are in the scene (against naming at random), exact captions, the caption tokens'
loss; and the held-out code loss (nats/token), which the frozen model cannot lose.
Prints a markdown table (mean and range over seeds) and writes a bar plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from herd.data.datasets import text_documents
from herd.model import Llama4
from herd.pipeline import code_documents, load_or_train_tokenizer, model_config_for
from herd.train.captions import caption_accuracy, generate_captions
from herd.train.config import quick
from herd.train.metrics import measure_matmul_peak
from herd.train.recipes import TEXT_TOWER, Run, Stage, align, joint, run_stage, text

METRICS = {"shapes_named": "shape words in the captions", "shape_precision": "of them in the scene",
           "exact": "exact captions",
           "caption_loss": "held-out caption loss (nats/token)", "code_loss": "held-out code loss (nats/token)"}


def adapter_only(run: Run) -> Stage:
    """The align recipe's trainable set (language model frozen) on the joint stage's caption rows."""
    cfg, tc = run.cfg, run.cfg.train
    caption_rows = max(1, round(tc.batch_size * cfg.caption_fraction))
    stage = align(run)
    return dataclasses.replace(stage, config=run.stage_config(cfg.joint_steps, cfg.align_lr, balance="none"),
                               data=run.scene_loader(caption_rows, tc.seed + 7, with_clips=True))


def score(run: Run) -> dict:
    model = run.model
    model.eval()
    with torch.no_grad():
        captions = generate_captions(model, run.heldout, run.tokenizer)
        scenes = run.heldout_scenes()
        print("  held-out captions (truth):", "; ".join(f"{c!r} ({s.caption()!r})" for c, s in zip(captions[:3], scenes)))
        result = {**caption_accuracy(captions, scenes),
                  "caption_loss": run.caption_eval(model)["loss"], "code_loss": run.code_eval(model)["loss"]}
    model.train()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="docs/ablations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    tmp = Path(tempfile.mkdtemp())
    cfg = quick()
    cfg = dataclasses.replace(cfg, out=str(tmp), joint_steps=args.steps, align_steps=args.steps, clips=0,
                              caption_fraction=0.25,  # 2 caption rows of 8, as documented
                              train=dataclasses.replace(cfg.train, steps=args.text_steps, progress=False,
                                                        eval_every=10**6, ckpt_every=10**6, log_every=50))
    train_texts, val_texts = code_documents(cfg)
    tok = load_or_train_tokenizer(cfg, tmp, train_texts)
    train_docs, val_docs = text_documents(train_texts, tok), text_documents(val_texts, tok)
    peak = measure_matmul_peak()  # only for the stages' duration estimates
    torch.manual_seed(0)
    base = Run(cfg, tmp / "text", tok, Llama4(model_config_for(cfg.model, tok)), train_docs, val_docs, peak)
    run_stage(base, text(base))
    text_weights = {k: v for k, v in base.model.state_dict().items() if k.startswith(TEXT_TOWER)}
    print(f"shared text model: held-out code loss {base.code_eval(base.model)['loss']:.3f} "
          f"after {args.text_steps} steps", flush=True)

    results: dict[str, list[dict]] = {}
    for seed in map(int, args.seeds.split(",")):
        for name, recipe in (("early fusion (joint, all weights)", joint),
                             ("adapter only (language model frozen)", adapter_only)):
            torch.manual_seed(seed)  # the seed's vision tower, the shared text model
            model = Llama4(model_config_for(cfg.model, tok))
            model.load_state_dict(text_weights, strict=False)
            seeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            run = Run(seeded, tmp / f"{seed}-{recipe.__name__}", tok, model, train_docs, val_docs, peak)
            start = time.process_time()
            run_stage(run, recipe(run))
            r = {**score(run), "cpu_s": time.process_time() - start}
            results.setdefault(name, []).append(r)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in (*METRICS, "cpu_s")), flush=True)

    chance = np.mean([r["shape_chance"] for rs in results.values() for r in rs])
    print(f"\nshared text model: {args.text_steps} steps x 8 x {cfg.train.seq_len} tokens; then {args.steps} steps "
          f"per model, {len(results[name])} seed(s); {cfg.heldout_images} held-out scenes; shapes named at random: "
          f"{chance:.0%}; total CPU time {time.process_time() - cpu0:.0f} s\n")
    print("| model | " + " | ".join(METRICS.values()) + " | training CPU s |")
    print("|---" * (len(METRICS) + 2) + "|")
    fmt = lambda xs, f: f.format(np.mean(xs)) + (f" ({f.format(min(xs))}-{f.format(max(xs))})" if len(xs) > 1 else "")  # noqa: E731
    for name, rs in results.items():
        form = {"shape_precision": "{:.0%}", "exact": "{:.0%}", "shapes_named": "{:.0f}"}
        cells = [fmt([r[k] for r in rs], form.get(k, "{:.3f}")) for k in METRICS]
        print(f"| {name} | " + " | ".join(cells) + f" | {fmt([r['cpu_s'] for r in rs], '{:.0f}')} |")
    plot(results, chance, Path(args.out) / "early_fusion.png")


def plot(results: dict[str, list[dict]], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key in zip(axes, ("shape_precision", "caption_loss", "code_loss")):
        for i, (name, rs) in enumerate(results.items()):
            xs = [r[key] for r in rs]
            ax.bar(i, np.mean(xs), color=f"C{i}", label=name)
            ax.plot([i] * len(xs), xs, "k.", ms=8)  # each seed
        if key == "shape_precision":
            ax.axhline(chance, color="gray", ls="--", lw=1, label="naming at random")
        ax.set_title({"shape_precision": "shapes named that are in the scene"}.get(key, METRICS[key]), fontsize=9)
        ax.set_xticks([])
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("early fusion against adapter-only (frozen language model): bars = mean, dots = seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
