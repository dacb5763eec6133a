"""`herd eval MODEL`: every evaluation of herd/eval on one checkpoint, into report.md, results.json
and PNG figures in one folder.

Sections (each also a module of this package):
    perplexity   bits per byte and perplexity on held-out stdlib code, and on --data files
    position     cumulative average NLL by position past the training length, power-law fit
    needle       needle-in-a-haystack grid, exact match and likelihood, effective length
    speed        prefill and decode tokens/s of herd's engine on this machine
    tasks        pass@1 / pass@k on held-out problems of herd's verifiable tasks (herd.tasks)

`--transformers` evaluates a checkpoint that only `transformers` loads, as a baseline, through the
same perplexity and NLL-by-position code (the sections that need herd's engine are skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SECTIONS = ("perplexity", "position", "needle", "tasks", "speed")
HERD_ONLY = ("needle", "speed", "tasks")  # need herd's tokenizer and engine


@dataclass
class EvalConfig:
    model: str
    out: str | None = None  # default: eval/ beside the model folder (runs/main/model -> runs/main/eval)
    data: str | None = None  # the user's files (folder or JSONL) for a second perplexity row
    train_len: int | None = None  # default: seq_len from the run's config.json beside the model folder
    transformers: bool = False  # load with transformers (baseline): perplexity and position only
    device: str = "cpu"
    sections: tuple[str, ...] = SECTIONS
    text_bytes: int = 200_000  # held-out code for perplexity
    window: int | None = None  # perplexity window in tokens; default the training length
    nll_len: int | None = None  # default max(4 x training length, 2 x chunk), within the model's context
    nll_files: int = 8
    needle_lengths: tuple[int, ...] | None = None  # default training length x (1/2, 1, 2, 4)
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 2
    distractors: int = 4
    threshold: float = 0.5  # effective length: mean accuracy over depths at least this
    tasks: tuple[str, ...] = ("letters", "arithmetic", "scenes", "clips")  # herd.tasks; images only with a vision tower
    task_problems: int = 16  # held-out problems per task
    task_samples: int = 4  # sampled answers per problem: pass@1 and pass@task_samples
    task_tokens: int = 64  # longest answer
    speed_prompt: int = 512
    speed_new: int = 32


def quick(cfg: EvalConfig) -> EvalConfig:
    """Seconds on a tiny model: fewer files, a smaller grid, a short speed run."""
    return dataclasses.replace(cfg, text_bytes=20_000, nll_files=2, needle_depths=(0.0, 0.5, 1.0), needle_trials=1,
                               task_problems=4, task_samples=2, task_tokens=24, speed_prompt=64, speed_new=8)


@dataclass
class Loaded:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]  # begin-of-text (or the model's prefix token) first
    context: int  # the model's longest context
    chunk: int | None  # RoPE chunk size of iRoPE's chunked layers
    tokenizer: object = None  # herd's Tokenizer (None for a transformers baseline)
    kind: str = "herd"


def load(cfg: EvalConfig) -> Loaded:
    if cfg.transformers:
        try:  # herd itself never needs transformers; a baseline does
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ValueError("--transformers loads the baseline with the transformers package: "
                             "pip install transformers") from None

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, attn_implementation="eager")
        model = model.to(cfg.device).eval()
        tok = AutoTokenizer.from_pretrained(cfg.model)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise ValueError(f"{cfg.model}: the tokenizer has neither a bos nor an eos token to start a document")
        text_config = getattr(model.config, "text_config", model.config)
        return Loaded(model, lambda s: [prefix] + tok(s, add_special_tokens=False)["input_ids"],
                      text_config.max_position_embeddings, getattr(text_config, "attention_chunk_size", None),
                      kind="transformers")
    from ..hf import from_pretrained
    from ..tokenizer import Tokenizer

    model = from_pretrained(cfg.model, device=cfg.device)
    tokenizer = Tokenizer.from_dir(cfg.model)
    t = model.config.text
    return Loaded(model, lambda s: tokenizer.encode(s, bos=True), t.max_position_embeddings, t.attention_chunk_size,
                  tokenizer)


def training_length(cfg: EvalConfig, context: int) -> tuple[int, str]:
    """(length, where it came from)."""
    if cfg.train_len:
        return cfg.train_len, "--train-len"
    run_config = Path(cfg.model).resolve().parent / "config.json"
    if run_config.exists():
        seq_len = json.loads(run_config.read_text()).get("train", {}).get("seq_len")
        if seq_len:
            return int(seq_len), str(run_config)
    return context // 4, "unknown (no run config.json beside the model): a quarter of the model's context; pass --train-len"


def _spread(texts: list[str], max_bytes: int) -> list[str]:
    """Evenly spaced texts up to about max_bytes, so a sample spans the whole corpus."""
    total = sum(len(t.encode("utf-8")) for t in texts)
    picked = texts[:: max(1, round(total / max_bytes))]
    out, n = [], 0
    for t in picked:
        if n >= max_bytes:
            break
        out.append(t)
        n += len(t.encode("utf-8"))
    return out


def _long_documents(docs: list[list[int]], want: int, files: int) -> tuple[list[list[int]], int]:
    """Up to `files` documents and the length they all reach: `want`, or less if too few are that long."""
    longest = sorted(docs, key=len, reverse=True)[:files]
    if not longest or len(longest[-1]) < 2:
        raise ValueError("no held-out document is long enough for NLL by position")
    return longest, min(want, len(longest[-1]))


def _perplexity(cfg: EvalConfig, loaded: Loaded, heldout: list[str], train_len: int) -> dict:
    from ..data.corpora import read_user_texts
    from .perplexity import score_texts

    window = min(cfg.window or train_len, loaded.context)
    rows = {"held-out stdlib code": _spread(heldout, cfg.text_bytes)}
    if cfg.data:
        rows[f"your data ({cfg.data})"] = [d.text for d in read_user_texts(cfg.data, on_error="skip")]
    return {"window": window,
            "rows": {name: score_texts(loaded.model, loaded.encode, texts, window).to_dict() for name, texts in rows.items()}}


def _position(cfg: EvalConfig, loaded: Loaded, heldout: list[str], train_len: int, out: Path) -> dict:
    from .plots import plot_nll_by_position
    from .position import cumulative_average, fit_power_law, nll_by_position, segment_means

    want = cfg.nll_len or min(loaded.context, max(4 * train_len, 2 * (loaded.chunk or 0)))
    # the longest files by characters, cut to 16 characters a token: encoding every file is slow
    longest = sorted(heldout, key=len, reverse=True)[: 2 * cfg.nll_files]
    docs, length = _long_documents([loaded.encode(t[: 16 * want]) for t in longest], want, cfg.nll_files)
    nll = nll_by_position(loaded.model, docs, length)
    cumulative = cumulative_average(nll)
    fit = fit_power_law(cumulative)
    marks = {"training length": train_len, "RoPE chunk": loaded.chunk}
    marks = {k: v for k, v in marks.items() if v and v < length}
    name = Path(cfg.model).name
    plot_nll_by_position({name: cumulative}, {name: fit}, marks, out / "nll_by_position.png")
    bounds = [loaded.chunk or 0] + [int(train_len * f) for f in (0.5, 1, 2, 4, 8)]
    return {"length": length, "files": len(docs), "nll": nll.tolist(), "cumulative": cumulative.tolist(), "fit": fit,
            "segments": segment_means(nll, bounds), "marks": marks}


def _needle(cfg: EvalConfig, loaded: Loaded, heldout: list[str], train_len: int, out: Path) -> dict:
    from .needle import effective_length, filler_lines, run_needle
    from .plots import plot_needle

    lengths = cfg.needle_lengths or tuple(n for n in (train_len // 2, train_len, 2 * train_len, 4 * train_len)
                                          if 32 <= n <= loaded.context - 8)
    if not lengths:
        raise ValueError(f"no default needle length fits training length {train_len} and context {loaded.context}; "
                         "pass --needle-lengths")
    lines = filler_lines(loaded.tokenizer, _spread(heldout, max(20_000, 32 * max(lengths))))
    result = run_needle(loaded.model, loaded.tokenizer, lines, lengths, cfg.needle_depths, cfg.needle_trials,
                        cfg.distractors)
    result["effective_length"] = {"threshold": cfg.threshold, **{
        score: effective_length(lengths, np.array(result[score]), cfg.threshold)
        for score in ("exact_match", "likelihood_top1")}}
    plot_needle(result, out / "needle.png", train_len)
    return result


def output_folder(cfg: EvalConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.model).resolve().parent / "eval"


def _tasks(cfg: EvalConfig, loaded: Loaded, tasks: Sequence | None) -> dict:
    from .tasks import held_out, score_tasks

    skipped = {}
    if tasks is None:
        tasks, skipped = held_out(cfg.tasks, cfg.task_problems, loaded.model.config.vision is not None)
    scores = score_tasks(loaded.model, loaded.tokenizer, tasks, samples=cfg.task_samples,
                         ks=sorted({1, cfg.task_samples}), max_new_tokens=cfg.task_tokens)
    return {"kinds": scores, "skipped": skipped, "max_new_tokens": cfg.task_tokens}


def run_eval(cfg: EvalConfig, tasks: Sequence | None = None) -> dict:
    """Runs the sections, writes results.json, the figures and report.md; returns the results.
    `tasks` (objects with `prompt` and `check`, see herd.eval.tasks) replaces herd's held-out
    problems in the tasks section (and runs it)."""
    from ..data.corpora import stdlib_texts
    from .report import write_report

    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; sections are {', '.join(SECTIONS)}")
    out = output_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load(cfg)
    train_len, train_len_source = training_length(cfg, loaded.context)
    heldout = [d.text for d in stdlib_texts("validation")]
    results: dict = {"model": str(cfg.model), "kind": loaded.kind, "train_len": train_len,
                     "train_len_source": train_len_source, "chunk_size": loaded.chunk, "context": loaded.context,
                     "params": sum(p.numel() for p in loaded.model.parameters()), "device": cfg.device,
                     "config": dataclasses.asdict(cfg), "seconds": {}, "skipped": {}}
    # speed last: its decode-time module swaps change the model in place
    run = [s for s in ("perplexity", "position", "needle", "tasks", "speed")
           if s in cfg.sections or (s == "tasks" and tasks)]
    for section in run:
        if loaded.kind != "herd" and section in HERD_ONLY:
            results["skipped"][section] = "needs herd's tokenizer and inference engine (a transformers baseline)"
            continue
        start = time.perf_counter()
        with torch.no_grad():
            if section == "perplexity":
                results[section] = _perplexity(cfg, loaded, heldout, train_len)
            elif section == "position":
                results[section] = _position(cfg, loaded, heldout, train_len, out)
            elif section == "needle":
                results[section] = _needle(cfg, loaded, heldout, train_len, out)
            elif section == "tasks":
                results[section] = _tasks(cfg, loaded, tasks)
            elif section == "speed":
                from ..inference import prepare_for_decoding
                from .speed import measure_speed

                results[section] = measure_speed(prepare_for_decoding(loaded.model), cfg.speed_prompt, cfg.speed_new)
        results["seconds"][section] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results)
    return results


def main_job_section(model_dir: str | Path, run_dir: str | Path, train_len: int, nll_len: int, nll_files: int) -> dict:
    """`herd eval`'s key figures on the final model of `herd train`, for the run's report.md: bits per
    byte, NLL by position to at least twice the training length with its power-law fit, a small
    needle grid (half, one and twice the training length at three depths, one trial: within the
    job's time).
    The full report, results and figures go to eval/ in the run folder. Returns {"lines": markdown,
    "plots": figure paths relative to the run folder, "seconds": time taken}."""
    out = Path(run_dir) / "eval"
    cfg = EvalConfig(model=str(model_dir), out=str(out), train_len=train_len,
                     sections=("perplexity", "position", "needle"), text_bytes=20_000,
                     nll_len=max(nll_len, 2 * train_len), nll_files=nll_files, needle_depths=(0.0, 0.5, 1.0),
                     needle_trials=1, needle_lengths=(train_len // 2, train_len, 2 * train_len))
    start = time.perf_counter()
    r = run_eval(cfg)
    ppl, pos, needle = r["perplexity"]["rows"]["held-out stdlib code"], r["position"], r["needle"]
    fit, eff = pos["fit"], needle["effective_length"]
    by_length = lambda grid: ", ".join(  # noqa: E731  mean over depths, per context length
        f"{n}: {np.mean([row[j] for row in grid]):.0%}" for j, n in enumerate(needle["lengths"]))
    lines = ["## Evaluation (`herd eval`)", "",
             f"`herd eval` on the final model (training length {train_len} tokens); the full report is "
             "[eval/report.md](eval/report.md).", "",
             "| measure | value |", "|---|---|",
             f"| bits per byte, held-out stdlib code ({ppl['tokens']:,} tokens) | {ppl['bpb']:.3f} "
             f"(perplexity {ppl['perplexity']:.1f}) |"]
    lines += [f"| NLL by position, tokens {s['from']}-{s['to']} | {s['mean_nll']:.3f} nats |" for s in pos["segments"]]
    lines += [f"| power-law fit a + b t^-c of the cumulative NLL to {pos['length']} tokens | a = {fit['a']:.3f}, "
              f"b = {fit['b']:.3f}, c = {fit['c']:.3f}, R² = {fit['r2']:.3f}"
              + (" (c at the edge of the search: not a power law)" if fit.get("c_at_bound") else "") + " |",
              f"| needle, exact match by context length | {by_length(needle['exact_match'])} |",
              f"| needle, likelihood top-1 of {needle['distractors'] + 1} by context length (chance "
              f"{needle['chance_top1']:.0%}) | {by_length(needle['likelihood_top1'])} |",
              f"| needle effective length (≥ {eff['threshold']:.0%}): exact / likelihood | "
              f"{eff['exact_match'] or 'none'} / {eff['likelihood_top1'] or 'none'} |", "",
              "![NLL by position](eval/nll_by_position.png)", "", "![needle](eval/needle.png)", ""]
    return {"lines": lines, "plots": ["eval/nll_by_position.png", "eval/needle.png"],
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """--quick picks the small settings first; flags given explicitly override them."""
    cfg = EvalConfig(model=args.model)
    if args.quick:
        cfg = quick(cfg)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)
             if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **given)
    if cfg.transformers and args.sections is None:
        cfg = dataclasses.replace(cfg, sections=("perplexity", "position"))
    return cfg


def _eval_cmd(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    results = run_eval(cfg)
    out = output_folder(cfg)
    for name, row in results.get("perplexity", {}).get("rows", {}).items():
        print(f"{name}: {row['bpb']:.3f} bits/byte, perplexity {row['perplexity']:.2f}")
    if "position" in results:
        fit = results["position"]["fit"]
        print(f"NLL by position to {results['position']['length']} tokens: fit c={fit['c']:.3f}, R^2={fit['r2']:.3f}")
    if "needle" in results:
        eff = results["needle"]["effective_length"]
        print(f"needle effective length (>= {eff['threshold']:.0%}): exact match {eff['exact_match']}, "
              f"likelihood {eff['likelihood_top1']}")
    for name, kind in results.get("tasks", {}).get("kinds", {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v:.0%}" for k, v in kind.items() if k.startswith("pass@")))
    if "speed" in results:
        s = results["speed"]
        print(f"speed: prefill {s['prefill_tokens_per_s']:.0f} tokens/s, decode {s['decode_tokens_per_s']:.1f} tokens/s")
    print(f"report: {out / 'report.md'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: bits/byte, NLL by position, needle, tasks, speed",
                              description="Writes report.md, results.json and PNG figures into --out.")
    p.add_argument("model", help="checkpoint directory (HF layout: config.json, safetensors, tokenizer.json)")
    p.add_argument("--out", help="output folder (default: eval/ beside the model folder)")
    p.add_argument("--data", help="your files (folder or JSONL) for a second perplexity row")
    p.add_argument("--train-len", dest="train_len", type=int,
                   help="the model's training length in tokens (default: read from the run's config.json)")
    p.add_argument("--transformers", action="store_true", default=None,
                   help="load with transformers as a baseline (perplexity and NLL by position only)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--sections", type=_numbers(str), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--text-bytes", dest="text_bytes", type=int, help="held-out code bytes for perplexity")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default: the training length)")
    p.add_argument("--nll-len", dest="nll_len", type=int, help="positions of the NLL-by-position curve")
    p.add_argument("--nll-files", dest="nll_files", type=int)
    p.add_argument("--needle-lengths", dest="needle_lengths", type=_numbers(int), help="e.g. 128,256,512,1024")
    p.add_argument("--needle-depths", dest="needle_depths", type=_numbers(float), help="e.g. 0,0.5,1")
    p.add_argument("--needle-trials", dest="needle_trials", type=int)
    p.add_argument("--distractors", type=int)
    p.add_argument("--threshold", type=float)
    p.add_argument("--tasks", type=_numbers(str),
                   help="herd's verifiable tasks to score (letters,arithmetic,scenes,clips)")
    p.add_argument("--task-problems", dest="task_problems", type=int, help="held-out problems per task")
    p.add_argument("--task-samples", dest="task_samples", type=int, help="sampled answers per problem (pass@k)")
    p.add_argument("--task-tokens", dest="task_tokens", type=int, help="longest answer in tokens")
    p.add_argument("--speed-prompt", dest="speed_prompt", type=int)
    p.add_argument("--speed-new", dest="speed_new", type=int)
    p.add_argument("--quick", action="store_true", help="a small grid and few files: seconds on a tiny model")
    p.set_defaults(func=_eval_cmd)
