"""Does heavy SFT restrict RL? RL after lightweight SFT on the hard part against SFT on everything
(issue 12 item 8; SPEC 6: Llama 4 dropped over half its SFT data as easy, 95% for Behemoth,
because heavy SFT left online RL less to explore).

    python experiments/sft_hard_vs_all.py --base runs/main/base [--seeds 0,1] [--keep 0.5] [--out runs/sft_hard] [herd train overrides]

From the same pretrained checkpoint, per seed, `herd train --init=BASE --stages=sft,rl` twice with
the default preset's post-training settings, differing only in `--sft_keep`:
- hard: the hardest `--keep` share of each task's prompts and of the code instructions (ranked by
  the model's pass@k, then its loss on the reference answer: the SFT recipe's tagger);
- all: `--sft_keep=1`, everything the tagger does not call easy (at this scale, everything).
Same SFT steps (the hard set is seen about twice as often), same RL steps. Reported: greedy
held-out accuracy per task after pretraining, SFT and RL (the run's own evaluation), and what RL
added. A finished run (its summary.json) is read, not rerun, so the experiment resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from herd.cli import main as herd

TASKS = ("letters", "arithmetic", "scenes")


def one_run(base: Path, out: Path, keep: float, seed: int, stages: str, extra: list[str]) -> dict:
    summary = out / "summary.json"
    if not summary.exists():
        code = herd(["train", f"--init={base}", f"--stages={stages}", f"--sft_keep={keep}", f"--seed={seed}",
                     f"--out={out}", *extra])
        if code != 0:
            raise SystemExit(f"herd train failed ({code}) for {out}")
    return json.loads(summary.read_text())["task_accuracy"]


def table(results: dict[str, list[dict]]) -> str:
    """Mean held-out accuracy (%) over seeds, the per-seed values in brackets."""
    lines = ["| SFT data | after | " + " | ".join(TASKS) + " | mean |", "|---|---|" + "---|" * (len(TASKS) + 1)]
    for variant, runs in results.items():
        for stage in ("pretrained", "sft", "rl"):
            cells = []
            for task in (*TASKS, None):
                per_seed = [100 * (r[stage][task] if task else sum(r[stage][t] for t in TASKS) / len(TASKS))
                            for r in runs]
                cells.append(f"{sum(per_seed) / len(per_seed):.1f} ({', '.join(f'{v:.0f}' for v in per_seed)})")
            lines.append(f"| {variant} | {stage} | " + " | ".join(cells) + " |")
        gains = [sum(r["rl"][t] - r["sft"][t] for t in TASKS) / len(TASKS) * 100 for r in runs]
        lines.append(f"| {variant} | RL - SFT | | | | {sum(gains) / len(gains):+.1f} "
                     f"({', '.join(f'{g:+.0f}' for g in gains)}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/main/base"), help="a pretrained herd checkpoint")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--keep", type=float, default=0.5, help="the hard variant's --sft_keep")
    ap.add_argument("--out", type=Path, default=Path("runs/sft_hard"))
    ap.add_argument("--stages", default="sft,rl", help="sft,rl,dpo also runs DPO after each (not in the table)")
    args, overrides = ap.parse_known_args()  # the rest go to every herd train, e.g. --rl_steps=20
    if not (args.base / "config.json").exists():
        raise SystemExit(f"{args.base} is not a herd checkpoint: run `herd train` first (runs/main/base) or pass --base")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for name, keep in ((f"hardest {args.keep:.0%}", args.keep), ("all", 1.0)):
        results[name] = [one_run(args.base, args.out / f"keep{keep}_seed{seed}", keep, seed, args.stages, overrides)
                         for seed in seeds]
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
