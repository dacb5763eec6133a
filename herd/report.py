"""The run report: report.md with PNG plots, built from metrics.jsonl and the run's summary.json.

Plots: training and validation loss per stage against the unigram baseline; per-layer expert load
over time (a heatmap per MoE layer: one row per expert, the fraction of routed tokens it got);
the cumulative average NLL by position on held-out code files (SPEC 7: it should fall with
position and flatten); throughput and MFU of the language-model stages; online RL's reward,
zero-advantage fraction and KL over its steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .train.metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import, so importing herd sets nothing
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], unigram: float | None, path: Path) -> None:
    plt = _plt()
    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        train = sorted((r["step"], r["loss"]) for r in records if r["stage"] == stage and r.get("kind") == "train")
        val = sorted((r["step"], r["loss"]) for r in records if r["stage"] == stage and r.get("kind") == "eval"
                     and "loss" in r)
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", ms=3)
        if unigram is not None and stage in ("text", "joint"):
            ax.axhline(unigram, color="gray", ls="--", lw=1, label="unigram baseline")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: Path) -> bool:
    rows = [r for r in records if r.get("kind") == "train" and "expert_load" in r]
    if not rows:
        return False
    plt = _plt()
    load = np.array([r["expert_load"] for r in rows])  # [time, layers, E]
    labels = [f"{r['stage']} {r['step']}" for r in rows]
    n_layers = load.shape[1]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.0 + 1.1 * n_layers * max(1, load.shape[2] / 8)),
                             squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(load[:, i].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        ticks = np.linspace(0, len(rows) - 1, min(6, len(rows))).astype(int)
        ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=7)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="fraction of routed tokens")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_nll(nll: list[float], path: Path) -> None:
    plt = _plt()
    nll = np.asarray(nll)
    cumulative = np.cumsum(nll) / np.arange(1, len(nll) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(np.arange(1, len(nll) + 1), cumulative)
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("cumulative average NLL (nats)")
    ax.set_title("held-out code files")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(records: list[dict], path: Path) -> None:
    plt = _plt()
    rows = [r for r in records if r.get("kind") == "train" and r["stage"] in ("text", "joint")]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for stage in ("text", "joint"):
        pts = sorted((r["step"], r["tokens_per_s"]) for r in rows if r["stage"] == stage)
        if pts:
            ax.plot(*zip(*pts), label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    if rows:  # a run of post-training stages alone has no language-model pretraining to show
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rl(records: list[dict], path: Path) -> bool:
    """Online RL over its steps: reward and accuracy of the sampled answers, the share of groups
    dropped as zero-advantage, and the KL to the policy as RL started."""
    rows = sorted((r for r in records if r.get("kind") == "train" and r["stage"] == "rl" and "reward" in r),
                  key=lambda r: r["step"])
    if not rows:
        return False
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key in ("reward", "accuracy"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[1].plot(steps, [r["zero_advantage_groups"] for r in rows])
    axes[2].plot(steps, [r.get("kl", float("nan")) for r in rows])
    for ax, title in zip(axes, ("sampled answers", "groups dropped (zero advantage)", "KL to the start of RL")):
        ax.set_title(title)
        ax.set_xlabel("rl step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _median(records: list[dict], stage: str, key: str) -> float | None:
    values = [r[key] for r in records if r.get("kind") == "train" and r["stage"] == stage and key in r]
    return float(np.median(values)) if values else None


def write_report(out: str | Path, summary: dict) -> Path:
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    records = read_metrics(out / "metrics.jsonl")
    plot_losses(records, summary.get("unigram_loss"), plots / "loss.png")
    has_load = plot_expert_load(records, plots / "expert_load.png")
    plot_nll(summary["nll_by_position"], plots / "nll_by_position.png")
    plot_throughput(records, plots / "throughput.png")
    has_rl = plot_rl(records, plots / "rl.png")

    code = summary["final_code"]
    lines = ["# herd training report", "",
             f"Model: `{summary['config']['model']}` preset, {summary['params']:,} parameters. "
             f"Run time {summary['total_seconds'] / 60:.1f} min.", "",
             "## Results", "", "| measure | value |", "|---|---|",
             f"| validation loss (held-out code) | {code['loss']:.3f} nats/token |",
             f"| unigram baseline (token frequencies only) | {summary['unigram_loss']:.3f} nats/token |",
             f"| bits per byte | {code['bpb']:.3f} |"]
    if "base_code" in summary:
        lines.append(f"| validation loss of the pretrained base (before post-training) | "
                     f"{summary['base_code']['loss']:.3f} nats/token |")
    if "final_code_with_selection_bias" in summary:
        lines.append(f"| validation loss with the training-time selection bias | "
                     f"{summary['final_code_with_selection_bias']['loss']:.3f} |")
    if "caption_accuracy" in summary:
        acc = summary["caption_accuracy"]
        whose = " of the pretrained base" if "base_code" in summary else ""  # captioning is a pretraining check
        lines += [f"| held-out captions{whose}: named shapes present in the image | {acc['shape_precision']:.1%} "
                  f"(chance {acc['shape_chance']:.1%}, {acc['shapes_named']} shapes named over {acc['n']} images) |",
                  f"| held-out captions{whose}: exactly right | {acc['exact']:.1%} |"]
    for stage, res in summary["stages"].items():
        extras = ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float))
        lines.append(f"| stage `{stage}` (final) | {extras} |")
    lines += ["", "![losses](plots/loss.png)", ""]
    accuracy = summary.get("task_accuracy", {})
    if accuracy:
        tasks = [t for t in accuracy["pretrained"] if not t.endswith(("_format", "_sampled"))]
        sampled = any(f"{tasks[0]}_sampled" in acc for acc in accuracy.values())
        lines += ["## Post-training: held-out accuracy per task", "",
                  "Answers to held-out problems, scored by the tasks' checkers: right answers, and in brackets "
                  "the share of well-formed answers that stopped on their own" +
                  (" (the response quality DPO targets). Greedy, then sampled at the RL temperature." if sampled
                   else "."), "",
                  "| after | " + " | ".join(tasks) + (" | " + " | ".join(f"{t}, sampled" for t in tasks)
                                                       if sampled else "") + " |",
                  "|---" * (len(tasks) * (1 + sampled) + 1) + "|"]
        for stage, acc in accuracy.items():
            cells = [f"{acc[t]:.0%} ({acc[f'{t}_format']:.0%})" for t in tasks]
            if sampled:  # not measured for the base (herd.train.recipes.Run.pretrained_accuracy)
                cells += [f"{acc[f'{t}_sampled']:.0%} ({acc[f'{t}_sampled_format']:.0%})" if f"{t}_sampled" in acc
                          else "–" for t in tasks]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        sft = summary["stages"].get("sft", {})
        if "dropped_easy" in sft:
            own = summary["config"].get("sft_data")
            lines += ["", f"SFT dropped {sft['dropped_easy']:.0%} of its data as easy for the pretrained model "
                      f"(task prompts {sft['dropped_easy_tasks']:.0%}, "
                      f"{'conversations of ' + own if own else 'code instructions'} {sft['dropped_easy_code']:.0%})."]
        if has_rl:
            dropped = _median(records, "rl", "zero_advantage_groups")
            lines += ["", f"Online RL dropped a median {dropped:.0%} of its sampled groups per step as "
                      "zero-advantage (every answer scored the same) and refilled the batch.", "",
                      "![rl](plots/rl.png)"]
        lines.append("")
    lines += ["## Throughput", "", "| stage | tokens/s (median) | MFU vs measured fp32 matmul peak | time |",
              "|---|---|---|---|"]
    for stage, seconds in summary["timings"].items():
        tok = _median(records, stage, "tokens_per_s")
        mfu = _median(records, stage, "mfu")
        lines.append(f"| {stage} | {f'{tok:,.0f}' if tok else '-'} | {f'{mfu:.1%}' if mfu else '-'} | {seconds:.0f} s |")
    lines += ["", f"Peak measured in the run: {summary['peak_flops'] / 1e9:.1f} GFLOP/s (fp32 matmul); model "
              f"FLOPs per token {summary['flops_per_token'] / 1e6:.1f} M.", "", "![throughput](plots/throughput.png)", ""]
    if has_load:
        lines += ["## Expert load", "", "Fraction of routed tokens per expert, per MoE layer, over training. "
                  "A balanced router keeps every row near 1/E; collapse is one bright row.", "",
                  "![expert load](plots/expert_load.png)", ""]
    nll = np.asarray(summary["nll_by_position"])
    lines += ["## NLL by position", "",
              f"Mean NLL on held-out code files: positions 1-16 {nll[:16].mean():.2f}, last 64 positions "
              f"{nll[-64:].mean():.2f} nats.", "", "![nll](plots/nll_by_position.png)", ""]
    lines += summary.get("eval", {}).get("lines", [])  # herd eval's key figures (herd.eval.command)
    lines += ["## Samples", ""]
    for s in summary["code_samples"]:
        lines += ["```python", s["prompt"] + "«" + s["completion"] + "»", "```", ""]
    if "captions" in summary:
        lines += ["Captions of held-out images (greedy):", "", "| generated | truth |", "|---|---|"]
        lines += [f"| {c['caption']} | {c['truth']} |" for c in summary["captions"][:12]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
