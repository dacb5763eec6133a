"""`herd train`: the end-to-end main job, from raw text and images to a report and a checkpoint.

    tokenizer   train a byte-level BPE on the code corpus (or load one)
    data        tokenize code into a packed stream; draw synthetic scenes for the vision stages
    stages      (SPEC 6, each resumable, each reachable with --stages=NAME)
      contrastive  CLIP-style pretraining of the vision encoder on image-caption pairs
      text         language-model pretraining on code (the bulk of the compute)
      align        adapter alignment: vision tower + projector learn, the language model is frozen
      joint        early-fusion training on a mixture of code and captioned images, all weights
    results     a Hugging Face checkpoint with the tokenizer, samples, NLL by position,
                held-out captioning, and report.md with plots

Every stage goes through the one training loop (herd.train.loop); this file only chooses data,
loss, frozen parameters and evaluation per stage. Re-running the same command after an
interruption resumes: finished stages load their last checkpoint, the interrupted one continues
from its newest checkpoint with the same batches it would have seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .model import Llama4
from .presets import get_preset
from .tokenizer import Tokenizer, train_tokenizer
from .train.config import PRESETS, STAGES, RunConfig, TrainConfig, apply_overrides, parse_overrides


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def load_or_train_tokenizer(cfg: RunConfig, out: Path, texts) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.from_dir(cfg.tokenizer)
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
    special = lambda name: tokenizer.special_id(name)  # noqa: E731
    text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.end_of_text_id, pad_token_id=tokenizer.pad_id)
    return dataclasses.replace(config, text=text, image_token_index=tokenizer.patch_id,
                               boi_token_index=special("<|image_start|>"), eoi_token_index=special("<|image_end|>"))


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


def _freeze_all_but(model: Llama4, prefixes: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


TEXT_TOWER = ("embed_tokens.", "layers.", "norm.", "lm_head.")


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------

def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Runs (or resumes) the job in `cfg.out`; returns the summary that report.md is built from."""
    from .train.captions import CaptionRows, ContrastivePairs, Mixture, SceneSet, caption_accuracy, generate_captions
    from .train.checkpoint import check_writable, save_model
    from .eval import LMEvaluator, nll_by_position, token_byte_lengths
    from .train.loop import train
    from .train.losses import ContrastiveLoss, causal_lm_loss
    from .train.metap import metap_init_
    from .train.metrics import measure_matmul_peak, training_flops_per_token
    from .train.sources import TextWindows, TokenStream

    from .distributed import init_distributed

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    ctx = init_distributed()  # None unless started by torchrun with several processes
    main_rank = ctx is None or ctx.is_main
    if ctx is not None and set(stages) != {"text"}:
        stages = ("text",)
        if main_rank:
            print("distributed run: text pretraining only (FSDP2 + expert parallelism); run the vision "
                  "stages in one process (--stages=contrastive,align,joint) from its checkpoint")
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
    encode = lambda texts: [[tokenizer.bos_id] + ids for ids in tokenizer.encode_batch(texts)]  # noqa: E731
    train_docs, val_docs = encode(train_texts), encode(val_texts)
    train_stream = TokenStream(train_docs, tokenizer.end_of_text_id)
    val_stream = TokenStream(val_docs, tokenizer.end_of_text_id)
    model_cfg = model_config_for(cfg.model, tokenizer)
    vision = model_cfg.vision
    need_images = vision is not None and any(s in stages and getattr(cfg, f"{s}_steps") > 0
                                             for s in ("contrastive", "align", "joint"))
    if need_images:
        scenes = SceneSet(tokenizer, vision.image_size, vision.patch_size, cfg.images, seed=tc.seed)
        heldout = SceneSet(tokenizer, vision.image_size, vision.patch_size, cfg.heldout_images,
                           start=10_000_000, seed=tc.seed)
    t = lap("data", t)
    if main_rank:
        print(f"data: {len(train_stream):,} training tokens ({len(train_docs)} files), {len(val_stream):,} "
              f"validation tokens; {cfg.images if need_images else 0} training scenes; {tokenizer}")

    torch.manual_seed(tc.seed)
    model = Llama4(model_cfg)
    if tc.metap:
        metap_init_(model, tc.base_width, tc.base_depth)
    byte_lengths = token_byte_lengths(tokenizer)
    code_eval = LMEvaluator([TextWindows(val_stream, tc.batch_size, tc.seq_len, seed=tc.seed + 1).batch(i)
                             for i in range(tc.eval_batches)], byte_lengths)
    peak = measure_matmul_peak()
    flops = training_flops_per_token(model, tc.seq_len)
    results: dict[str, dict] = {}

    def stage_config(steps: int, lr: float, **changes) -> TrainConfig:
        return dataclasses.replace(tc, steps=steps, lr=lr, warmup_steps=min(tc.warmup_steps, max(1, steps // 5)),
                                   eval_every=min(tc.eval_every, steps), ckpt_every=min(tc.ckpt_every, steps),
                                   **changes)

    checkpointer = None
    if ctx is not None:
        from .distributed import parallelize
        from .distributed.checkpoint import ShardedCheckpointer

        model = parallelize(model, ctx.mesh)
        checkpointer = ShardedCheckpointer(out / "checkpoints" / "text", tc.keep_checkpoints)

    def fit(stage: str, scfg: TrainConfig, data, loss, evaluate, trainable: tuple[str, ...]):
        _freeze_all_but(model, trainable)
        start = time.perf_counter()
        result = train(model, scfg, data, loss, out, stage=stage, evaluate=evaluate, checkpointer=checkpointer,
                       flops_per_token=flops if stage in ("text", "joint") else None, peak_flops=peak)
        timings[stage] = time.perf_counter() - start
        results[stage] = {"loss": result.loss, **result.eval}

    # ---- stages
    if "contrastive" in stages and cfg.contrastive_steps and need_images:
        clip = ContrastiveLoss(vision.projector_output_dim, model_cfg.text.hidden_size)
        held = ContrastivePairs(heldout, len(heldout), seed=tc.seed + 1).batch(0)

        def retrieval(m):
            img, txt = clip.embed_images(m, held.pixel_values), clip.embed_texts(m, held.input_ids, held.attention_mask)
            top1 = (img @ txt.T).argmax(1) == torch.arange(len(img))
            return {"loss": clip(m, held).loss_sum.item() / len(img), "image_to_text_top1": top1.float().mean().item(),
                    "chance": 1 / len(img)}

        fit("contrastive", stage_config(cfg.contrastive_steps, cfg.contrastive_lr, balance="none"),
            ContrastivePairs(scenes, cfg.image_batch, seed=tc.seed), clip, retrieval, ("vision.",))
    if "text" in stages and tc.steps:
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        fit("text", tc, TextWindows(train_stream, tc.batch_size, tc.seq_len, seed=tc.seed, rank=rank,
                                    world_size=world), causal_lm_loss, code_eval, TEXT_TOWER)
    if need_images:
        caption_eval = LMEvaluator([CaptionRows(heldout, tc.batch_size, tc.seq_len, tokenizer.pad_id,
                                                seed=tc.seed + 1).rows(i, tc.batch_size) for i in range(2)])
    if "align" in stages and cfg.align_steps and need_images:
        fit("align", stage_config(cfg.align_steps, cfg.align_lr, balance="none"),
            CaptionRows(scenes, tc.batch_size, tc.seq_len, tokenizer.pad_id, seed=tc.seed), causal_lm_loss,
            caption_eval, ("vision.", "projector."))
    if "joint" in stages and cfg.joint_steps and need_images:
        rows = max(1, round(tc.batch_size * cfg.caption_fraction))
        mixture = Mixture(TextWindows(train_stream, tc.batch_size, tc.seq_len, seed=tc.seed + 7),
                          CaptionRows(scenes, tc.batch_size, tc.seq_len, tokenizer.pad_id, seed=tc.seed + 7), rows)
        fit("joint", stage_config(cfg.joint_steps, cfg.joint_lr), mixture, causal_lm_loss,
            lambda m: {**code_eval(m), "caption_loss": caption_eval(m)["loss"]}, ("",))
    t = time.perf_counter()

    # ---- results: checkpoint, evaluations, samples
    model.eval()
    with torch.no_grad():
        with_bias = code_eval(model)
    # The selection bias steered training only; the checkpoint (and everything below) is the plain
    # reference forward that transformers also runs.
    for m in model.modules():
        if hasattr(m, "selection_bias"):
            m.selection_bias = None
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
    summary: dict = {"config": cfg.to_dict(), "stages": results, "params": model.num_parameters(),
                     "unigram_loss": train_stream.unigram_entropy(val_stream, tokenizer.vocab_size),
                     "peak_flops": peak, "flops_per_token": flops, "train_tokens": len(train_stream)}
    with torch.no_grad():
        summary["final_code"] = code_eval(model)
        summary["final_code_with_selection_bias"] = with_bias
        nll = nll_by_position(model, val_docs[: 4 * cfg.nll_files], cfg.nll_len)
        summary["nll_by_position"] = nll.tolist()
        prompts = _code_prompts(val_texts, cfg.samples)
        summary["code_samples"] = _sample_code(model, tokenizer, prompts)
        if need_images:
            captions = generate_captions(model, heldout)
            summary["captions"] = [{"caption": c, "truth": s.caption()} for c, s in zip(captions, heldout.scenes)]
            summary["caption_accuracy"] = caption_accuracy(captions, heldout)
    lap("evaluation", t)
    summary["timings"] = timings
    summary["total_seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import write_report

    report = write_report(out, summary)
    _print_summary(summary, report)
    if ctx is not None:
        torch.distributed.destroy_process_group()
    return summary


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
