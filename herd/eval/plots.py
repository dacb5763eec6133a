"""The figures of `herd eval`, written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import, so importing herd sets nothing
    import matplotlib.pyplot as plt

    return plt


def plot_nll_by_position(curves: dict[str, np.ndarray], fits: dict[str, dict], marks: dict[str, int],
                         path: Path) -> None:
    """Cumulative average NLL by position, one line per model, each with its power-law fit dashed;
    vertical lines at `marks` (e.g. the training length, the RoPE chunk size)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, cumulative in curves.items():
        t = np.arange(1, len(cumulative) + 1)
        line, = ax.plot(t, cumulative, label=name)
        fit = fits.get(name)
        if fit is not None:
            ax.plot(t, fit["a"] + fit["b"] * t ** -fit["c"], "--", color=line.get_color(), lw=1,
                    label=f"fit a+b·t^-c: c={fit['c']:.2f}, R²={fit['r2']:.3f}")
    for label, x in marks.items():
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], f" {label}", fontsize=7, va="top", rotation=90, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("token position t")
    ax.set_ylabel("cumulative average NLL (nats)")
    ax.set_title("held-out code files")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle(result: dict, path: Path, train_len: int | None) -> None:
    """Two heatmaps, depth by context length: exact match and the likelihood variant's top-1."""
    plt = _plt()
    lengths, depths = result["lengths"], result["depths"]
    panels = [("exact match (greedy)", result["exact_match"]),
              (f"likelihood top-1 of {result['distractors'] + 1} (chance {result['chance_top1']:.0%})",
               result["likelihood_top1"])]
    fig, axes = plt.subplots(1, 2, figsize=(4.6 + 1.0 * len(lengths), 1.2 + 0.55 * len(depths)), squeeze=False,
                             constrained_layout=True)
    for ax, (title, grid) in zip(axes[0], panels):
        grid = np.asarray(grid)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n}{'*' if n == train_len else ''}" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens; * training length)")
        ax.set_ylabel("needle depth")
        ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
