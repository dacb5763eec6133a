"""Typed training configs, named presets, and `--key=value` overrides.

`TrainConfig` holds everything one call of the training loop needs (optimiser, schedule, batch,
checkpoints, load balancing, MetaP, FP8). `RunConfig` is the end-to-end job `herd train` runs: the
model preset, the data, and how many steps each stage gets (SPEC 6: contrastive vision
pretraining, text pretraining, adapter alignment with the language model frozen, joint early-fusion
training), with one `TrainConfig` shared by all stages. Presets are plain functions returning a
`RunConfig`; overrides name a field of either dataclass (`--lr=1e-3`, `--joint_steps=500`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

Schedule = Literal["cosine", "wsd", "constant"]
Balance = Literal["bias", "aux", "none"]
DistillWeighting = Literal["fixed", "dynamic"]
Stage = Literal["contrastive", "text", "align", "joint", "sft", "rl", "dpo"]  # the default order
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass
class TrainConfig:
    """One training loop: optimiser, schedule, batch shape, evaluation, checkpoints, features."""

    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch (per data-parallel rank)
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimiser step
    # AdamW with decoupled weight decay on matrices only (norms, biases, embeddings excluded)
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # learning-rate schedule: linear warmup, then cosine to min_lr, or warmup-stable-decay
    schedule: Schedule = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    # MoE load balancing (SPEC 2.2): the DeepSeek-V3 selection bias, the auxiliary loss, or none
    balance: Balance = "bias"
    bias_rate: float = 1e-3  # bias += rate * sign(mean_count - count), each optimiser step
    aux_weight: float = 1e-2
    # MetaP (muP-style) per-layer learning rates and init scales relative to a base shape
    metap: bool = False
    base_width: int = 128
    base_depth: int = 4
    fp8: bool = False  # float8 matmuls with dynamic scaling for linear layers and experts
    compile: bool = False  # torch.compile the model
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # consecutive NaN/inf steps before the run stops
    seed: int = 0
    progress: bool = True  # tqdm progress bar
    sync_inference_every: int = 0  # steps between refreshes of the loop's decode-ready copy; 0 = no copy
    # codistillation (herd/train/distill.py): soft targets from a teacher, mixed with the hard ones
    teacher: str = ""  # an HF-layout herd checkpoint with the student's tokenizer; empty = no teacher
    distill_weighting: DistillWeighting = "fixed"  # fixed alpha (best at tiny scale), or schedule x confidence
    distill_alpha: float = 0.9  # soft-target weight (fixed), or its value at the first step (dynamic)
    distill_alpha_end: float = 0.3  # dynamic: the scheduled weight at the last step
    distill_temperature: float = 1.0
    train_teacher: bool = False  # codistillation proper: the teacher trains in the same run
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    bf16: bool = False  # under torchrun: FSDP2 gathers and computes in bf16; fp32 weights, states, reductions
    expert_parallel: int = 0  # under torchrun: ranks per FSDP + expert-parallel group (0 = all; fewer = 2-D mesh)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "log_every", "ckpt_every", "keep_checkpoints", "max_bad_steps", "base_width",
                     "base_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.sync_inference_every < 0:
            raise ValueError(f"sync_inference_every must be >= 0 (0 = no inference copy), "
                             f"got {self.sync_inference_every}")
        if self.expert_parallel < 0:
            raise ValueError(f"expert_parallel must be >= 0 (0 = every rank), got {self.expert_parallel}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _check_choice("schedule", self.schedule, Schedule)
        _check_choice("balance", self.balance, Balance)
        _check_choice("distill_weighting", self.distill_weighting, DistillWeighting)
        for name in ("distill_alpha", "distill_alpha_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a weight in [0, 1], got {getattr(self, name)}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}")


@dataclass
class RunConfig:
    """The end-to-end job: tokenizer, data, and the stages of SPEC 6 in order."""

    model: str = "tiny"  # a model preset of herd.presets
    out: str = "runs/main"  # run folder: config, metrics, checkpoints, plots, report
    data: str = ""  # your own text (folder or JSONL); empty = the Python standard library
    tokenizer: str = ""  # a tokenizer directory; empty = train one on the training text
    init: str = ""  # start from this HF-layout herd checkpoint (its weights and tokenizer), not from scratch
    bpe_ranks: int = 7936
    tokenizer_bytes: int = 8_000_000  # training text for the tokenizer
    code_bytes: int = 0  # cap on the code corpus (0 = all of it)
    # steps per stage (text pretraining takes `train.steps`, i.e. --steps); 0 skips a stage
    contrastive_steps: int = 1000
    align_steps: int = 0  # Meta's adapter alignment; off by default (docs/training.md: the default run)
    joint_steps: int = 400
    contrastive_lr: float = 2e-3
    align_lr: float = 2e-3
    joint_lr: float = 1e-3
    images: int = 16000  # synthetic training scenes
    image_batch: int = 32  # image-caption pairs per micro-batch in the vision stages
    caption_fraction: float = 0.5  # joint stage: share of rows that are image-caption rows
    clips: int = 400  # joint stage: captioned synthetic clips (4 frames each) among the caption rows' documents
    samples: int = 4  # code samples and captions shown at the end
    heldout_images: int = 64  # held-out scenes for the captioning check
    nll_files: int = 16  # held-out code files for NLL by position
    nll_len: int = 1024
    train: TrainConfig = field(default_factory=TrainConfig)
    # post-training (herd/train/recipes.py: sft, dpo); 0 steps skips a stage
    post_tasks: str = "letters,arithmetic,scenes"  # verifiable tasks (scenes and clips only with a vision tower)
    post_eval_problems: int = 128  # held-out problems per task for the greedy accuracy (32 left 9 points of noise)
    post_eval_samples: int = 2  # and sampled answers to each for the sampled measures (0: greedy only)
    answer_tokens: int = 64  # most tokens a sampled or greedy answer may take
    sft_steps: int = 150
    sft_lr: float = 1e-3
    sft_problems: int = 256  # train-pool problems per task, before the easy ones are dropped
    sft_code: int = 256  # code instructions from the stdlib, before the easy ones are dropped
    sft_data: str = ""  # your conversations (TRL JSONL: messages, or prompt/completion) instead of tasks + code
    tag_samples: int = 2  # sampled answers per problem for its pass@k difficulty tag (ties: answer loss)
    tag_k: int = 1  # the k of pass@k
    easy_pass_rate: float = 0.5  # pass@k at or above this: easy, dropped
    easy_loss: float = 0.5  # code instructions whose answer loss (nats/token) is below this: easy, dropped
    sft_keep: float = 0.5  # then keep the hardest share of each task and of the code (Llama 4 dropped over half)
    rl_steps: int = 40
    rl_lr: float = 1e-4
    rl_problems: int = 64  # candidate train-pool problems per task; re-filtering keeps the medium-to-hard ones
    rl_prompts: int = 8  # prompts per batch (groups), refilled after zero-advantage groups are dropped
    rl_group: int = 4  # sampled completions per prompt (G)
    rl_refilter_every: int = 10  # steps between re-scorings of the candidates by the current policy
    rl_fresh: bool = True  # each re-scoring draws rl_problems new candidates per task (False: the same ones)
    rl_max_attempts: int = 4  # draws per batch at most while refilling
    rl_temperature: float = 0.7  # sampling temperature of the rollouts (1.0 left --quick's SFT model no reward)
    rl_eps_low: float = 0.2  # clip range below 1 ...
    rl_eps_high: float = 0.28  # ... and above (DAPO's clip-higher)
    rl_kl_beta: float = 0.0  # weight of the KL to the frozen start-of-RL policy (logged either way)
    dpo_steps: int = 30
    dpo_lr: float = 2e-5
    dpo_beta: float = 0.1
    dpo_nll_weight: float = 0.0
    dpo_problems: int = 64  # train-pool problems per task the policy answers to make preference pairs
    dpo_samples: int = 4  # sampled answers per problem
    dpo_pairs: int = 4  # preference pairs per micro-batch
    dpo_data: str = ""  # your preference pairs (TRL JSONL: prompt/chosen/rejected) instead of the policy's own

    def __post_init__(self):
        for name in ("contrastive_steps", "align_steps", "joint_steps", "code_bytes", "sft_steps", "sft_problems",
                     "sft_code", "rl_steps", "rl_problems", "dpo_steps", "dpo_problems", "clips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.caption_fraction < 1:
            raise ValueError(f"caption_fraction must be in [0, 1), got {self.caption_fraction}")
        for name in ("post_eval_problems", "answer_tokens", "tag_samples", "tag_k", "dpo_pairs", "rl_prompts",
                     "rl_refilter_every", "rl_max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.tag_k > self.tag_samples:
            raise ValueError(f"tag_k ({self.tag_k}) cannot exceed tag_samples ({self.tag_samples}): pass@k needs "
                             "at least k samples")
        if self.post_eval_samples == 1 or self.post_eval_samples < 0:
            raise ValueError(f"post_eval_samples must be 0 (greedy only) or at least 2, got {self.post_eval_samples}")
        if self.dpo_samples < 2:
            raise ValueError(f"dpo_samples must be at least 2 (a pair needs two answers), got {self.dpo_samples}")
        if self.rl_group < 2:
            raise ValueError(f"rl_group must be at least 2 (advantages are relative to the group), got {self.rl_group}")
        if not self.rl_temperature > 0:
            raise ValueError(f"rl_temperature must be positive (rollouts are sampled), got {self.rl_temperature}")
        if not 0 < self.rl_eps_low < 1 or self.rl_eps_high <= 0 or self.rl_kl_beta < 0:
            raise ValueError(f"need 0 < rl_eps_low < 1, rl_eps_high > 0 and rl_kl_beta >= 0, got {self.rl_eps_low}, "
                             f"{self.rl_eps_high}, {self.rl_kl_beta}")
        if not 0 < self.sft_keep <= 1:
            raise ValueError(f"sft_keep must be in (0, 1] (1 keeps everything not tagged easy), got {self.sft_keep}")
        if not 0 < self.easy_pass_rate <= 1:
            raise ValueError(f"easy_pass_rate must be in (0, 1], got {self.easy_pass_rate}")
        if not self.dpo_beta > 0:
            raise ValueError(f"dpo_beta must be positive, got {self.dpo_beta}")
        from ..tasks import TASKS

        unknown = [t for t in self.post_task_names if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown post_tasks {unknown}; choose from {', '.join(TASKS)}")

    @property
    def post_task_names(self) -> list[str]:
        return [t.strip() for t in self.post_tasks.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, choices) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def default() -> RunConfig:
    """The main job: a tiny Llama 4 from scratch on a 2-core CPU in about 12-15 minutes."""
    return RunConfig(train=TrainConfig(steps=800, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=50,
                                       eval_every=200, ckpt_every=200))


def quick() -> RunConfig:
    """The same pipeline in under two minutes: every stage runs, learning is only beginning."""
    return RunConfig(out="runs/quick", tokenizer_bytes=2_000_000, code_bytes=3_000_000,
                     contrastive_steps=20, align_steps=20, joint_steps=40,
                     images=400, clips=40, heldout_images=24, samples=2, nll_files=4, nll_len=512,
                     sft_steps=40, sft_lr=2e-3, sft_problems=32, sft_code=32, post_eval_problems=16,
                     answer_tokens=40, rl_steps=6, rl_problems=12, rl_prompts=4, rl_refilter_every=3,
                     dpo_steps=6, dpo_problems=12,
                     train=TrainConfig(steps=150, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=15,
                                       eval_every=75, eval_batches=4, ckpt_every=75, bias_rate=1e-2))


def smoke() -> RunConfig:
    """Seconds: for tests. A small tokenizer and a few steps of each stage."""
    return RunConfig(out="runs/smoke", bpe_ranks=1024, tokenizer_bytes=300_000, code_bytes=400_000,
                     contrastive_steps=3, align_steps=3, joint_steps=4,
                     images=64, clips=8, image_batch=8, heldout_images=8, samples=1, nll_files=2, nll_len=128,
                     sft_steps=3, sft_problems=6, sft_code=6, post_eval_problems=4, answer_tokens=16,
                     rl_steps=3, rl_problems=4, rl_prompts=2, rl_group=2, rl_refilter_every=2, rl_max_attempts=2,
                     dpo_steps=3, dpo_problems=4, dpo_samples=2, dpo_pairs=2,
                     train=TrainConfig(steps=6, batch_size=4, seq_len=128, warmup_steps=2, eval_every=3,
                                       eval_batches=2, ckpt_every=3, log_every=1, progress=False))


PRESETS = {"default": default, "quick": quick, "smoke": smoke}


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------

def _convert(name: str, text: str, kind: Any) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise ValueError(f"--{name} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return text  # str and Literal fields; Literals are checked by __post_init__


def override_keys() -> list[str]:
    run = [f.name for f in dataclasses.fields(RunConfig) if f.name != "train"]
    return sorted(run + [f.name for f in dataclasses.fields(TrainConfig)])


def apply_overrides(cfg: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """Returns a copy of `cfg` with fields of RunConfig or TrainConfig replaced by parsed strings.
    An unknown key is an error that lists the valid ones."""
    run_hints, train_hints = get_type_hints(RunConfig), get_type_hints(TrainConfig)
    run_changes, train_changes = {}, {}
    for key, text in overrides.items():
        name = key.replace("-", "_")
        if name in train_hints:
            train_changes[name] = _convert(key, text, train_hints[name])
        elif name in run_hints and name != "train":
            run_changes[name] = _convert(key, text, run_hints[name])
        else:
            raise ValueError(f"unknown setting --{key}; valid keys: {', '.join(override_keys())}")
    train = dataclasses.replace(cfg.train, **train_changes)
    return dataclasses.replace(cfg, train=train, **run_changes)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr=1e-3', '--steps', '100'] -> {'lr': '1e-3', 'steps': '100'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # "--fp8" alone switches a flag on; "--steps 100" also works
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"
            else:
                value = args[i + 1]
                i += 1
        out[key] = value
        i += 1
    return out
