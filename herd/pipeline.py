"""`herd train`: the end-to-end main job, from raw text and images to a report and a checkpoint.

    tokenizer   train a byte-level BPE on the code corpus (or load one)
    data        tokenize code into documents (images are drawn when a stage first needs them)
    stages      a list of recipes (herd.train.recipes), each resumable, each reachable with
                --stages=NAME: contrastive, text, align, joint, then post-training: sft, rl, dpo
    results     a Hugging Face checkpoint with the tokenizer (`model`: the final, post-trained model;
                `base`: the pretrained one, kept before post-training), samples, NLL by position,
                held-out captioning, task accuracy per stage, and report.md with plots

This file keeps only the order: what each stage trains on, with which loss, which weights and
which evaluation, is its recipe; every stage goes through the one training loop. Re-running the
same command after an interruption resumes: finished stages load their last checkpoint, the
interrupted one continues from its newest checkpoint with the same batches it would have seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .model import Llama4
from .presets import get_preset
from .tokenizer import Tokenizer, train_tokenizer
from .train.config import PRESETS, STAGES, RunConfig, apply_overrides, parse_overrides


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def load_or_train_tokenizer(cfg: RunConfig, out: Path, texts) -> Tokenizer:
    if cfg.tokenizer or cfg.init:
        return Tokenizer.from_dir(cfg.tokenizer or cfg.init)
    saved = out / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return Tokenizer.from_dir(saved)
    picked, n = [], 0
    for text in texts:
        picked.append(text)
        n += len(text)
        if n >= cfg.tokenizer_bytes:
            break
    tokenizer = train_tokenizer(picked, num_bpe_ranks=cfg.bpe_ranks)
    tokenizer.save(saved)
    return Tokenizer.from_dir(saved)


def model_config_for(preset: str, tokenizer: Tokenizer) -> ModelConfig:
    """The preset's shape with the vocabulary and special ids of `tokenizer`."""
    config = get_preset(preset)
    text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.end_of_text_id, pad_token_id=tokenizer.pad_id)
    return dataclasses.replace(config, text=text, image_token_index=tokenizer.patch_id,
                               boi_token_index=tokenizer.image_start_id, eoi_token_index=tokenizer.image_end_id)


def code_documents(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(train texts, validation texts): the stdlib split, or the user's data with every 20th held out."""
    from .data.corpora import read_user_texts, stdlib_texts

    if cfg.data:
        texts = [d.text for d in read_user_texts(cfg.data, on_error="skip")]
        if len(texts) < 2:
            raise ValueError(f"--data {cfg.data} holds {len(texts)} text document(s); training needs at least 2")
        return [t for i, t in enumerate(texts) if i % 20 != 19], [t for i, t in enumerate(texts) if i % 20 == 19]
    train = [d.text for d in stdlib_texts("train")]
    val = [d.text for d in stdlib_texts("validation")]
    if cfg.code_bytes:  # a cap takes evenly spaced files, so the sample spans the whole library
        train, val = _spread(train, cfg.code_bytes), _spread(val, cfg.code_bytes // 4)
    return train, val


def _spread(texts: list[str], max_bytes: int) -> list[str]:
    total = sum(map(len, texts))
    stride = max(1, round(total / max_bytes))
    return texts[::stride]


def unigram_loss(train_docs, val_docs, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training tokens' add-one
    unigram distribution: the loss of a model that knows token frequencies and nothing else."""
    counts = np.bincount(np.concatenate([d.tokens for d in train_docs]), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.concatenate([d.tokens for d in val_docs])].mean())


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------

Recipe = Callable  # (herd.train.recipes.Run) -> Stage | None


def run(cfg: RunConfig, stages: Sequence[str | Recipe] = STAGES) -> dict:
    """Runs (or resumes) the job in `cfg.out`: the named stages (or recipes) in order, then the export
    and the report. Returns the summary that report.md is built from."""
    from .data.datasets import text_documents
    from .distributed import init_distributed
    from .train.balance import LoadBalancer
    from .train.captions import caption_accuracy, generate_captions
    from .train.checkpoint import check_writable, save_model
    from .eval import nll_by_position
    from .train.metap import metap_init_
    from .train.metrics import measure_matmul_peak
    from .train.recipes import POST_TRAINING, RECIPES, Run, run_stage

    unknown = [s for s in stages if isinstance(s, str) and s not in RECIPES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(RECIPES)}")
    recipes = [RECIPES[s] if isinstance(s, str) else s for s in stages]
    t0 = time.perf_counter()
    out = Path(cfg.out)
    ctx = init_distributed(cfg.train.expert_parallel)  # None unless started by torchrun with several processes
    main_rank = ctx is None or ctx.is_main
    if ctx is not None:
        recipes = distributed_recipes(recipes, main_rank)
    elif cfg.train.bf16:
        raise ValueError("--bf16 is FSDP2 mixed precision and applies under torchrun; one process trains in "
                         "fp32 (drop --bf16, or use --fp8 for low-precision matmuls)")
    elif cfg.train.expert_parallel:
        raise ValueError("--expert_parallel sizes the groups of a torchrun job's mesh; drop it in one process")
    if main_rank:
        check_writable(out)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    timings: dict[str, float] = {}
    tc = cfg.train

    def lap(name: str, start: float) -> float:
        timings[name] = time.perf_counter() - start
        return time.perf_counter()

    # ---- tokenizer and data
    t = time.perf_counter()
    train_texts, val_texts = code_documents(cfg)
    if main_rank:
        tokenizer = load_or_train_tokenizer(cfg, out, train_texts)
    if ctx is not None:  # rank 0 trained it; the others read the same files
        torch.distributed.barrier()
        tokenizer = load_or_train_tokenizer(cfg, out, train_texts)
    t = lap("tokenizer", t)
    train_docs, val_docs = text_documents(train_texts, tokenizer), text_documents(val_texts, tokenizer)
    t = lap("data", t)
    peak = measure_matmul_peak()
    if main_rank:
        print(f"data: {sum(map(len, train_docs)):,} training tokens ({len(train_docs)} files), "
              f"{sum(map(len, val_docs)):,} validation tokens; {tokenizer}\n"
              f"matmul peak of this machine: {peak / 1e9:.1f} GFLOP/s (measured)")

    torch.manual_seed(tc.seed)
    if cfg.init:  # continue from a checkpoint (e.g. --init=runs/main/base --stages=sft)
        from .hf import from_pretrained

        model = from_pretrained(cfg.init)
    else:
        model = Llama4(model_config_for(cfg.model, tokenizer))
        if tc.metap:
            metap_init_(model, tc.base_width, tc.base_depth)
    job = Run(cfg, out, tokenizer, model, train_docs, val_docs, peak)
    if ctx is not None:
        _ = job.flops_per_token  # counted on the whole weights now: on the shards it takes collectives
        job.rank, job.world_size, job.mesh = ctx.rank, ctx.world_size, ctx.mesh
        job.model = model = job.parallelize(model)

    # ---- stages; the pretrained model is kept as `base` before the first post-training stage
    base_saved = False
    for recipe in recipes:
        start = time.perf_counter()
        if recipe in POST_TRAINING:
            # Post-training trains and scores the model it saves: the reference forward, without the
            # pretraining stages' MoE selection biases, which no HF checkpoint keeps (its stages
            # balance "none" so none come back).
            LoadBalancer(model, "none").detach()
        stage = recipe(job)
        if stage is None:
            continue
        if time.perf_counter() - start > 1:  # making its data took time (post-training: tagging, sampling pairs)
            job.timings[f"{stage.name} data"] = time.perf_counter() - start
        if recipe in POST_TRAINING and not base_saved:
            save_plain(model, out / "base")  # under torchrun every rank joins the gather
            if main_rank:
                tokenizer.save(out / "base")
            base_saved = True
        run_stage(job, stage)
    timings |= job.timings
    t = time.perf_counter()

    # ---- results: checkpoint, evaluations, samples
    model.eval()
    with_bias = None
    if any(getattr(m, "selection_bias", None) is not None for m in model.modules()):  # pretraining only
        with torch.no_grad():
            with_bias = job.code_eval(model)
    # The selection bias steered training only; the checkpoint (and everything below) is the plain
    # reference forward that transformers also runs.
    LoadBalancer(model, "none").detach()
    final = out / "model"
    if ctx is not None:  # gather the shards into one HF checkpoint; rank 0 evaluates it alone
        from .distributed.checkpoint import export_hf

        export_hf(model, final)
        if not main_rank:
            torch.distributed.destroy_process_group()
            return {}
        from .hf import from_pretrained

        model = from_pretrained(final)
    else:
        save_model(model, final)
    tokenizer.save(final)
    summary: dict = {"config": cfg.to_dict(), "stages": job.results, "params": model.num_parameters(),
                     "unigram_loss": unigram_loss(train_docs, val_docs, tokenizer.vocab_size),
                     "peak_flops": peak, "flops_per_token": job.flops_per_token,
                     "train_tokens": sum(map(len, train_docs)), "estimated_seconds": job.estimates,
                     "task_accuracy": job.task_accuracy}
    with torch.no_grad():
        summary["final_code"] = job.code_eval(model)
        pretrained = model
        if base_saved:  # the pretraining checks read the pretrained model, kept before post-training
            from .hf import from_pretrained

            pretrained = from_pretrained(out / "base")
            summary["base_code"] = job.code_eval(pretrained)
        if with_bias is not None:
            summary["final_code_with_selection_bias"] = with_bias
        nll = nll_by_position(model, [d.tokens[:-1].tolist() for d in val_docs[: 4 * cfg.nll_files]], cfg.nll_len)
        summary["nll_by_position"] = nll.tolist()
        prompts = _code_prompts(val_texts, cfg.samples)
        summary["code_samples"] = _sample_code(model, tokenizer, prompts)
        if job.trained_on_images:
            captions = generate_captions(pretrained, job.heldout, tokenizer)
            scenes = job.heldout_scenes()
            summary["captions"] = [{"caption": c, "truth": s.caption()} for c, s in zip(captions, scenes)]
            summary["caption_accuracy"] = caption_accuracy(captions, scenes)
    t = lap("evaluation", t)
    from .eval.command import main_job_section

    summary["eval"] = main_job_section(final, out, tc.seq_len, cfg.nll_len, cfg.nll_files)
    lap("herd eval", t)
    summary["timings"] = timings
    summary["total_seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import write_report

    report = write_report(out, summary)
    _print_summary(summary, report)
    if ctx is not None:
        torch.distributed.destroy_process_group()
    return summary


def distributed_recipes(recipes: list[Recipe], main_rank: bool) -> list[Recipe]:
    """The stages a torchrun job runs: every one but contrastive pretraining (FSDP2 + expert
    parallelism, each rank its own rows and their images; post-training generates with a plain copy
    of the weights on each rank, herd.train.recipes). Contrastive pretraining is skipped: its
    in-batch negatives would need every rank's embeddings gathered, and its heads (in the loss,
    outside FSDP) their gradients reduced. Your own recipes run as they are."""
    from .train.recipes import RECIPES

    if RECIPES["contrastive"] in recipes and main_rank:
        print("distributed run: skipping contrastive pretraining (its in-batch negatives are per process); "
              "the vision encoder starts from its initialisation")
    return [r for r in recipes if r is not RECIPES["contrastive"]]


def save_plain(model: Llama4, path: Path) -> None:
    """The model in HF layout without the training-time MoE selection bias (the reference forward),
    leaving the training model's biases in place. A sharded model is gathered (every rank calls this)
    and written by rank 0."""
    from .distributed.checkpoint import export_hf
    from .model.moe import MoE
    from .train.checkpoint import save_model

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    biases = [m.selection_bias for m in moes]
    for m in moes:
        m.selection_bias = None
    try:
        if torch.distributed.is_initialized():
            export_hf(model, path)
        else:
            save_model(model, path)
    finally:
        for m, b in zip(moes, biases):
            m.selection_bias = b


def _code_prompts(texts: list[str], n: int) -> list[str]:
    """The opening lines (up to the first def/class) of held-out files: a docstring and imports."""
    prompts = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        head = "".join(lines[:8])
        if 40 <= len(head) <= 400:
            prompts.append(head)
        if len(prompts) == n:
            break
    return prompts


def _sample_code(model: Llama4, tokenizer: Tokenizer, prompts: list[str], new_tokens: int = 120) -> list[dict]:
    from .inference import generate

    samples = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)])
        out = generate(model, ids, new_tokens, temperature=0.7, top_p=0.95, seed=i,
                       stop_token_ids=[tokenizer.end_of_text_id])
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1]:].tolist(),
                                                                         skip_special=True)})
    return samples


def _print_summary(summary: dict, report: Path) -> None:
    code = summary["final_code"]
    print(f"\nvalidation loss {code['loss']:.3f} nats/token ({code['bpb']:.3f} bits/byte); unigram baseline "
          f"{summary['unigram_loss']:.3f}")
    if "caption_accuracy" in summary:
        acc = summary["caption_accuracy"]
        print(f"held-out captions: {acc['shape_precision']:.0%} of named shapes are in the image "
              f"(chance {acc['shape_chance']:.0%}); {acc['exact']:.0%} exact")
    for stage, estimate in summary.get("estimated_seconds", {}).items():
        print(f"{stage}: {summary['timings'][stage]:.0f} s (estimated {estimate:.0f} s)")
    for s in summary["code_samples"][:1]:
        print("\n--- sample ---\n" + s["prompt"] + s["completion"] + "\n---")
    print(f"\nfinished in {summary['total_seconds'] / 60:.1f} min; report: {report}")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def config_from_args(preset: str, quick: bool, overrides: list[str]) -> RunConfig:
    if quick:
        preset = "quick"
    if preset not in PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset](), parse_overrides(overrides))


def _train_cmd(args: argparse.Namespace) -> int:
    from .train.checkpoint import CheckpointWriteError
    from .train.loop import TrainingDiverged

    cfg = config_from_args(args.preset, args.quick, args.overrides)
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGES
    try:
        run(cfg, stages)
    except (CheckpointWriteError, TrainingDiverged) as e:
        print(f"herd train: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a tokenizer and a tiny Llama 4 from scratch (or your preset), with a report",
        description="Runs the whole job; any field of RunConfig/TrainConfig can be set with --key=value "
                    "(e.g. --steps=500 --lr=1e-3 --fp8 --balance=aux --out=runs/mine).")
    parser.add_argument("preset", nargs="?", default="default", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--quick", action="store_true", help="the same pipeline in under two minutes")
    parser.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.set_defaults(func=_train_cmd, overrides=[])
