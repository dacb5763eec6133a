"""Training stages as recipes: each names its data, its loss, the weights that learn and how it is judged.

A recipe is a function `(Run) -> Stage | None` (None: nothing to do, e.g. no vision tower or zero
steps). `Run` holds what stages share: the config, tokenizer, model, documents, and evaluators and
images built the first time a stage asks for them. `run_stage` sends a `Stage` through the one
training loop (herd.train.loop), which knows nothing of stages. `herd train` runs a list of them:

    contrastive  CLIP-style pretraining of the vision encoder on image-caption pairs
    text         language-model pretraining on code (the bulk of the compute)
    align        adapter alignment: vision tower + projector learn, the language model is frozen
    joint        early fusion on a mixture of code rows and captioned-image rows (scenes and clips), all weights learn
    sft          supervised fine-tuning on the hard part of task conversations and code instructions
    rl           online GRPO on task prompts (text and image) the policy keeps re-filtering to medium-to-hard
    dpo          DPO on pairs from the policy's own graded answers, against a frozen reference

Every row-shaped stage reads `PackedLoader` (herd.data.packing): documents packed into rows, each
label the next token of the same document where the document's target mask allows it (image
layout ids never; in a conversation, only what the assistant wrote). A new stage (SFT on
conversations, say) is one more function here or in your own code, passed to
`herd.pipeline.run(cfg, stages=[..., my_recipe])`; tests/test_pipeline.py runs one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..chat import render_chat
from ..data.chat_data import code_instructions, preference_pairs, render_chats, split_records
from ..data.corpora import read_user_data
from ..data.datasets import scene_documents
from ..data.documents import Document, chat_document
from ..data.images import ImageProcessor
from ..data.packing import Batch, Mixture, PackedLoader
from ..data.synthetic import make_scene
from ..model import Llama4
from ..tasks import Problem, Task, get_task
from ..tasks.clips import clip_documents
from ..tokenizer import Tokenizer
from .captions import ContrastivePairs
from .config import RunConfig, TrainConfig
from ..eval import LMEvaluator, token_byte_lengths
from ..distributed.sharing import block, share_work
from .difficulty import drop_easy, loss_difficulty, pass_rates
from .distill import DistillationLoss, load_teacher
from .loop import InferenceCopy, StepHook, train
from .losses import ContrastiveLoss, LossOutput, causal_lm_loss
from .metrics import training_flops_per_token
from .online_rl import OnlineRollouts
from .post_losses import DPOLoss, GRPOLoss, PreferenceBatch, answer_rows
from .rollouts import accuracy_by_task, dpo_pairs, preference_rows, sample_rollouts, sampled_scores, task_scores

TEXT_TOWER = ("embed_tokens.", "layers.", "norm.", "lm_head.")
# The MFU the decoder stages reach on 2-core CPUs (text 51%, joint 48% on a quiet AVX2 Zen 3 machine;
# docs/training.md), less a margin for a busy machine: what the duration estimate assumes before a
# stage has run a step.
TYPICAL_MFU = 0.45


@dataclass
class Stage:
    name: str
    config: TrainConfig
    data: object  # an iterator of Batches with state_dict()/load_state_dict() (herd.train.loop.DataSource)
    loss: Callable[[nn.Module, Batch], LossOutput]
    trainable: tuple[str, ...]  # parameter-name prefixes that learn; ("",) = all
    evaluate: Callable[[nn.Module], dict] | None = None
    decoder_rows: bool = False  # the decoder runs on full rows: log MFU, estimate the duration first
    images: bool = False  # the stage trains on images (the run then captions held-out ones)
    on_step: StepHook | None = None  # called before each step (herd.train.loop.StepContext)


@dataclass
class Run:
    """What the stages of one run share. Data for images is made the first time a stage needs it."""

    cfg: RunConfig
    out: Path
    tokenizer: Tokenizer
    model: Llama4
    train_docs: list[Document]
    val_docs: list[Document]
    peak_flops: float  # measured matmul FLOP/s of this machine
    rank: int = 0
    world_size: int = 1
    mesh: object = None  # the device mesh under torchrun (herd.distributed), else None
    results: dict[str, dict] = field(default_factory=dict)  # stage -> final loss and evaluation
    timings: dict[str, float] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)  # stage -> estimated seconds
    trained_on_images: bool = False
    task_accuracy: dict[str, dict] = field(default_factory=dict)  # "pretrained" / stage -> held-out accuracy

    @property
    def train_config(self) -> TrainConfig:
        return self.cfg.train

    def stage_config(self, steps: int, lr: float, **changes) -> TrainConfig:
        """The shared TrainConfig for a shorter stage: warmup, evaluation and checkpoints scaled to fit."""
        tc = self.cfg.train
        return dataclasses.replace(tc, steps=steps, lr=lr, warmup_steps=min(tc.warmup_steps, max(1, steps // 5)),
                                   eval_every=min(tc.eval_every, steps), ckpt_every=min(tc.ckpt_every, steps),
                                   **changes)

    def loader(self, docs: list[Document], batch_size: int, seed: int, **kw) -> PackedLoader:
        """This rank's loader over `docs` at the run's sequence length."""
        return PackedLoader(docs, seq_len=self.cfg.train.seq_len, batch_size=batch_size, pad_id=self.tokenizer.pad_id,
                            seed=seed, rank=self.rank, world_size=self.world_size, **kw)

    def scene_loader(self, batch_size: int, seed: int, with_clips: bool = False) -> PackedLoader:
        """This rank's captioned-scene rows (and, with_clips, captioned clips), each caption with its
        image(s). A batch without an image (a padding batch at the end of an epoch) still runs the
        vision tower, on zero tiles, so that every rank joins the same FSDP2 collectives."""
        tile = (self.vision.num_channels, self.vision.image_size, self.vision.image_size)
        docs = self.scenes + self.clips if with_clips else self.scenes
        return self.loader(docs, batch_size, seed, whole_documents=True, tile_shape=tile)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Under torchrun, FSDP2 + expert parallelism over the run's mesh (bf16 compute with --bf16);
        in one process the model as it is."""
        if self.mesh is None:
            return model
        from ..distributed import parallelize

        return parallelize(model, self.mesh, param_dtype=torch.bfloat16 if self.cfg.train.bf16 else None)

    @cached_property
    def teacher(self) -> nn.Module:
        """The --teacher checkpoint (the student's tokenizer, checked), loaded once for every stage
        that distils, and sharded like the model under torchrun."""
        device = next(self.model.parameters()).device
        return self.parallelize(load_teacher(self.cfg.train.teacher, self.model, device))

    def lm_loss(self, images: bool = False):
        """Next-token cross-entropy; with --teacher, the distillation loss (soft and hard targets)."""
        tc = self.cfg.train
        if not tc.teacher:
            return causal_lm_loss
        if images and self.teacher.vision is None:
            raise ValueError(f"--teacher {tc.teacher} has no vision tower, so it cannot read the joint stage's "
                             "image rows; distil the text stage only (--stages=text) or use a teacher with images")
        return DistillationLoss.from_config(self.teacher, tc)

    def checkpointer_for(self, stage: str):
        """None for one process (the loop's Hugging Face-layout checkpoints); sharded ones under torchrun."""
        if self.world_size == 1:
            return None
        from ..distributed.checkpoint import ShardedCheckpointer

        return ShardedCheckpointer(self.out / "checkpoints" / stage, self.cfg.train.keep_checkpoints)

    @cached_property
    def flops_per_token(self) -> float:
        return training_flops_per_token(self.model, self.cfg.train.seq_len)

    # ---------------------------------------------------------------- evaluation data
    @cached_property
    def code_eval(self) -> LMEvaluator:
        """Loss and bits per byte on the first batches of the packed held-out code (the same on every rank)."""
        tc = self.cfg.train
        held = PackedLoader(self.val_docs, seq_len=tc.seq_len, batch_size=tc.batch_size,
                            pad_id=self.tokenizer.pad_id, seed=tc.seed + 1)
        n = min(tc.eval_batches, held.batches_per_epoch())
        return LMEvaluator([held.batch_at(0, i) for i in range(n)], token_byte_lengths(self.tokenizer))

    # ---------------------------------------------------------------- images
    @property
    def vision(self):
        return self.model.config.vision

    @cached_property
    def image_processor(self) -> ImageProcessor:
        return ImageProcessor(tile_size=self.vision.image_size, patch_size=self.vision.patch_size, max_tiles=1)

    @cached_property
    def scenes(self) -> list[Document]:
        """Captioned synthetic scenes for training: <|begin_of_text|> image caption <|end_of_text|>."""
        return scene_documents(self.tokenizer, self.image_processor, self.cfg.images, seed=self.cfg.train.seed)

    @cached_property
    def clips(self) -> list[Document]:
        """Captioned synthetic clips of the clips task's train split (its test clips stay unseen)."""
        return clip_documents(self.tokenizer, self.image_processor, self.cfg.clips)

    @cached_property
    def heldout(self) -> list[Document]:
        """Scenes far from the training range, never trained on."""
        return scene_documents(self.tokenizer, self.image_processor, self.cfg.heldout_images,
                               start=HELDOUT_START, seed=self.cfg.train.seed)

    def heldout_scenes(self):
        return [make_scene(HELDOUT_START + i, self.cfg.train.seed) for i in range(len(self.heldout))]

    @cached_property
    def caption_eval(self) -> LMEvaluator:
        tc = self.cfg.train
        held = PackedLoader(self.heldout, seq_len=tc.seq_len, batch_size=tc.batch_size, pad_id=self.tokenizer.pad_id,
                            seed=tc.seed + 1, whole_documents=True)
        return LMEvaluator([held.batch_at(0, i) for i in range(min(2, held.batches_per_epoch()))])

    # ---------------------------------------------------------------- verifiable tasks (post-training)
    @cached_property
    def post_tasks(self) -> list[Task]:
        """The run's tasks; those that show images (scenes, clips) only when the model has a vision tower."""
        tasks = [get_task(name) for name in self.cfg.post_task_names]
        return [task for task in tasks if not task.vision or self.vision is not None]

    @property
    def post_processor(self) -> ImageProcessor | None:
        return self.image_processor if self.vision is not None else None

    @cached_property
    def task_heldout(self) -> list[Problem]:
        return [p for task in self.post_tasks
                for p in task.problems("test", self.cfg.post_eval_problems, seed=self.cfg.train.seed)]

    def train_problems(self, count: int, seed_offset: int) -> list[Problem]:
        return [p for task in self.post_tasks
                for p in task.problems("train", count, seed=self.cfg.train.seed + seed_offset)]

    def task_eval(self, model: nn.Module, sampled: bool = True) -> dict:
        """Greedy held-out accuracy per task (and the share of well-formed answers), by the checkers;
        with post_eval_samples and `sampled`, the same measured on sampled answers (at the RL
        temperature). Under torchrun each rank answers a block of the problems."""
        cfg, generator = self.cfg, self.generator(model)
        problems, samples = self.task_heldout, cfg.post_eval_samples if sampled else 0
        scores = self.share(lambda block, _: task_scores(generator, self.tokenizer, block,
                                                         max_new_tokens=cfg.answer_tokens,
                                                         image_processor=self.post_processor), problems)
        result = accuracy_by_task(problems, scores)
        if samples >= 2:  # rows seeded as one process seeds them (samples rows per problem)
            sampled = self.share(lambda block, start: sampled_scores(
                generator, self.tokenizer, block, samples=samples, max_new_tokens=cfg.answer_tokens,
                temperature=cfg.rl_temperature, seed=cfg.train.seed + 3 + start * samples,
                image_processor=self.post_processor), problems)
            result |= accuracy_by_task(problems, sampled, suffix="_sampled")
        return result

    def pretrained_accuracy(self) -> None:
        """The base model's held-out accuracy, measured once, before the first post-training stage:
        greedy only. A base model never learned to chat: its sampled answers score what its greedy
        ones score (nothing), and as it seldom stops they mostly run to `answer_tokens`, which made
        them the dearest evaluation of the run."""
        if "pretrained" not in self.task_accuracy:
            self.task_accuracy["pretrained"] = self.task_eval(self.model, sampled=False)

    # ---------------------------------------------------------------- generating under torchrun
    # A forward of the FSDP2 model is a series of collectives every rank must join, and generating
    # runs a different number of forwards on each rank (answers stop at different lengths). So under
    # torchrun each rank generates with a plain, unsharded copy of the current weights, a share of
    # the work each (`share`), and the results are all-gathered: every rank ends with the same tags,
    # pools and pairs. In one process all three are the identity: the model itself generates.
    def generator(self, model: nn.Module | None = None) -> nn.Module:
        """The model to generate with, as `model` (default: the run's) is now: itself in one process;
        under torchrun a plain copy gathered from the shards (a collective: every rank calls this at
        the same point), freed when its user lets go of it."""
        model = model if model is not None else self.model
        return model if self.world_size == 1 else InferenceCopy(model, decode_ready=False).model

    def share(self, work: Callable, items: list) -> list:
        """`work(block, start)` on this rank's block of `items`, the results of all ranks concatenated
        (herd.distributed.sharing); `work(items, 0)` in one process."""
        return share_work(work, items, self.rank, self.world_size)

    def frozen_copy(self) -> nn.Module:
        """A copy of the model as it is now, to be frozen (a DPO or KL reference): under torchrun
        built from the gathered weights and sharded like the model."""
        return copy.deepcopy(self.model) if self.world_size == 1 else self.parallelize(self.generator())

    @property
    def empty_tiles(self) -> tuple[int, int, int] | None:
        """Under torchrun, with a vision tower: the tile shape a post-training batch without images
        carries as empty pixel_values, so that every rank runs the vision tower (its FSDP2 collectives)
        each step. In one process None: such a batch skips the tower, as it always has (its weights
        then get no gradient rather than a zero one, which AdamW would still decay)."""
        if self.world_size == 1 or self.vision is None:
            return None
        return self.vision.num_channels, self.vision.image_size, self.vision.image_size


HELDOUT_START = 10_000_000  # index of the first held-out scene


# ------------------------------------------------------------------------------------------------
# The stages of `herd train`
# ------------------------------------------------------------------------------------------------

def contrastive(run: Run) -> Stage | None:
    cfg = run.cfg
    if run.vision is None or not cfg.contrastive_steps:
        return None
    clip = ContrastiveLoss(run.vision.projector_output_dim, run.model.config.text.hidden_size)
    held = ContrastivePairs(run.heldout, len(run.heldout), seed=cfg.train.seed + 1).batch_at(0)

    def retrieval(model):
        img = clip.embed_images(model, held.pixel_values)
        txt = clip.embed_texts(model, held.input_ids, held.attention_mask)
        top1 = (img @ txt.T).argmax(1) == torch.arange(len(img))
        return {"loss": clip(model, held).loss_sum.item() / len(img), "image_to_text_top1": top1.float().mean().item(),
                "chance": 1 / len(img)}

    return Stage("contrastive", run.stage_config(cfg.contrastive_steps, cfg.contrastive_lr, balance="none"),
                 ContrastivePairs(run.scenes, cfg.image_batch, seed=cfg.train.seed), clip, ("vision.",), retrieval,
                 images=True)


def text(run: Run) -> Stage | None:
    tc = run.cfg.train
    if not tc.steps:
        return None
    return Stage("text", tc, run.loader(run.train_docs, tc.batch_size, tc.seed), run.lm_loss(), TEXT_TOWER,
                 run.code_eval, decoder_rows=True)


def align(run: Run) -> Stage | None:
    cfg = run.cfg
    if run.vision is None or not cfg.align_steps:
        return None
    return Stage("align", run.stage_config(cfg.align_steps, cfg.align_lr, balance="none"),
                 run.scene_loader(cfg.train.batch_size, cfg.train.seed),
                 causal_lm_loss, ("vision.", "projector."), run.caption_eval, images=True)


def joint(run: Run) -> Stage | None:
    cfg, tc = run.cfg, run.cfg.train
    if run.vision is None or not cfg.joint_steps:
        return None
    caption_rows = max(1, round(tc.batch_size * cfg.caption_fraction))
    code = run.loader(run.train_docs, tc.batch_size - caption_rows, tc.seed)
    # The code rows carry on where the text stage stopped (the same row order, one epoch), so joint
    # training reads code it has not seen yet.
    code.batch = -(-tc.steps * tc.grad_accum * tc.batch_size // code.batch_size)
    captions = run.scene_loader(caption_rows, tc.seed + 7, with_clips=True)

    def evaluate(model):
        return {**run.code_eval(model), "caption_loss": run.caption_eval(model)["loss"]}

    return Stage("joint", run.stage_config(cfg.joint_steps, cfg.joint_lr), Mixture(code, captions),
                 run.lm_loss(images=True), ("",), evaluate, decoder_rows=True, images=True)


# ------------------------------------------------------------------------------------------------
# Post-training (SPEC 6): lightweight SFT on what the model finds hard, online RL, then DPO
# ------------------------------------------------------------------------------------------------

def sft(run: Run) -> Stage | None:
    """Supervised fine-tuning on the hard part of the task conversations and code instructions.

    Difficulty is tagged with the model as it is now: pass@k of sampled answers on the verifiable
    prompts, then the model's loss on the reference answer (a judge score: the only one for the code
    instructions, the tie-break for prompts with the same pass rate); what is easy is dropped, and of
    the rest only the hardest `sft_keep` share of each task and of the code is kept (Llama 4 dropped
    over half its SFT data as easy). The rest are packed as documents whose only targets are the
    assistant's tokens, through the one data path. With `sft_data`, the user's conversations
    replace both and are tagged by their answers' loss."""
    cfg, tc, tok, model = run.cfg, run.cfg.train, run.tokenizer, run.model
    if not cfg.sft_steps:
        return None
    run.pretrained_accuracy()
    generator = run.generator()
    was_training = model.training
    model.eval()
    problems = [] if cfg.sft_data else run.train_problems(cfg.sft_problems, seed_offset=0)
    tasks = [render_chat(p.messages(with_answer=True), tok, image_processor=run.post_processor) for p in problems]
    problems, tasks = [p for p, r in zip(problems, tasks) if len(r) <= tc.seq_len], [r for r in tasks
                                                                                     if len(r) <= tc.seq_len]

    def tag(block, start):  # rows seeded as one process seeds them (tag_samples rows per problem)
        return pass_rates(generator, tok, block, n=cfg.tag_samples, k=cfg.tag_k, max_new_tokens=cfg.answer_tokens,
                          seed=tc.seed + start * cfg.tag_samples, image_processor=run.post_processor)

    rates = run.share(tag, problems) if problems else []
    if cfg.sft_data:  # the user's conversations replace the tasks' and the code instructions
        chats, _ = split_records(read_user_data(cfg.sft_data, on_error="skip"))
        code = render_chats(chats, tok, run.post_processor, max_tokens=tc.seq_len, on_error="skip")
    else:
        code = [render_chat(c.messages, tok) for c in code_instructions("train", max_items=cfg.sft_code)]
        code = [r for r in code if len(r) <= tc.seq_len]

    def answer_losses(block, _):  # the judge score: the mean loss on the reference answer (low: it writes it)
        return torch.cat([loss_difficulty(generator, answer_rows(chunk, tok.pad_id))
                          for chunk in _chunks(block, 16)]).tolist()

    losses = run.share(answer_losses, tasks + code) if tasks or code else []
    model.train(was_training)

    # Each task apart, so the mix stays balanced: easy = pass@k at least easy_pass_rate, then all but
    # the hardest sft_keep share by (pass@k, answer loss); the code likewise by its answer loss alone.
    hard_tasks = []
    for name in dict.fromkeys(p.task for p in problems):
        mine = [i for i, p in enumerate(problems) if p.task == name]
        kept, _ = drop_easy([tasks[i] for i in mine], [(rates[i], -losses[i]) for i in mine], cfg.easy_pass_rate,
                            cfg.sft_keep)
        hard_tasks += kept
    hard_code, _ = drop_easy(code, [-x for x in losses[len(tasks):]], -cfg.easy_loss, cfg.sft_keep)

    total = len(tasks) + len(code)
    dropped = {"dropped_easy": 1 - (len(hard_tasks) + len(hard_code)) / max(total, 1),
               "dropped_easy_tasks": 1 - len(hard_tasks) / max(len(tasks), 1),
               "dropped_easy_code": 1 - len(hard_code) / max(len(code), 1)}
    tiles = run.post_processor.tokens_per_tile if run.post_processor else None
    docs = [chat_document(r, tok, tiles) for r in hard_tasks + hard_code]
    if not docs:
        raise ValueError(f"sft: all {total} examples were tagged easy; raise --easy_pass_rate or lower --easy_loss")
    if run.rank == 0:
        print(f"[sft] difficulty tags: dropped {dropped['dropped_easy']:.0%} as easy ({len(tasks)} task prompts, "
              f"{dropped['dropped_easy_tasks']:.0%} dropped; {len(code)} "
              f"{'conversations of ' + cfg.sft_data if cfg.sft_data else 'code instructions'}, "
              f"{dropped['dropped_easy_code']:.0%} dropped); training on {len(docs)} conversations")

    def evaluate(model):
        run.task_accuracy["sft"] = run.task_eval(model)  # the last evaluation is the stage's result
        return {**run.task_accuracy["sft"], **dropped}

    images = any(d.pixel_values is not None for d in docs)
    rows = run.loader(docs, tc.batch_size, tc.seed + 11, whole_documents=True,
                      tile_shape=run.empty_tiles if images else None)
    return Stage("sft", run.stage_config(cfg.sft_steps, cfg.sft_lr, balance="none"), rows, causal_lm_loss, ("",),
                 evaluate, images=images)


def rl(run: Run) -> Stage | None:
    """Online RL: GRPO with DAPO's token mean and clip-higher on rollouts of the policy as it learns
    (herd.train.online_rl: dynamic filtering of zero-advantage groups, a candidate pool of every
    task re-filtered to medium-to-hard prompts every `rl_refilter_every` steps). The KL to a frozen
    copy of the policy as RL starts is logged, and trained against only when `rl_kl_beta` > 0.
    Under torchrun `rl_prompts` is per rank: each rank samples its block of the global batch."""
    cfg, tc = run.cfg, run.cfg.train
    if not cfg.rl_steps:
        return None
    run.pretrained_accuracy()

    def candidates(refiltering: int) -> list[Problem]:  # new problems for each re-filtering (rl_fresh)
        return run.train_problems(cfg.rl_problems, seed_offset=2 + 1000 * refiltering)

    data = OnlineRollouts(run.generator(), run.tokenizer, candidates if cfg.rl_fresh else candidates(0),
                          prompts=cfg.rl_prompts, group_size=cfg.rl_group, max_new_tokens=cfg.answer_tokens,
                          refilter_every=cfg.rl_refilter_every, max_attempts=cfg.rl_max_attempts,
                          temperature=cfg.rl_temperature, seed=tc.seed + 2, image_processor=run.post_processor,
                          rank=run.rank, world_size=run.world_size, tile_shape=run.empty_tiles)
    loss = GRPOLoss(cfg.rl_eps_low, cfg.rl_eps_high, cfg.rl_kl_beta, reference=run.frozen_copy())

    def sample_the_current_policy(context):  # before each step's rollouts (a resumed run: its loaded weights)
        data.policy = run.generator(context.model)

    def evaluate(model):
        run.task_accuracy["rl"] = run.task_eval(model)
        return run.task_accuracy["rl"]

    # every step's rollouts are a fresh sample of the policy: log each one, for the report's curves
    return Stage("rl", run.stage_config(cfg.rl_steps, cfg.rl_lr, balance="none", log_every=1), data, loss, ("",),
                 evaluate, images=any(p.image is not None for p in data.candidates), on_step=sample_the_current_policy)


class PairBatches:
    """Fixed preference batches in a cycle; the position is the data's checkpoint state."""

    def __init__(self, batches: list[PreferenceBatch]):
        self.batches, self.index = batches, 0

    def __next__(self) -> PreferenceBatch:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def dpo(run: Run) -> Stage | None:
    """Lightweight DPO on pairs from the policy's own answers graded by the checkers (chosen: right
    and well-formed; rejected: wrong, ill-formed or cut off), against a frozen copy of the policy as
    it starts (a frozen model of the loop: not optimised, not checkpointed). With `dpo_data`, the
    user's preference pairs instead. Under torchrun `dpo_pairs` is per rank: each rank trains on its
    block of every global batch of pairs."""
    cfg, tc, tok, model = run.cfg, run.cfg.train, run.tokenizer, run.model
    if not cfg.dpo_steps:
        return None
    run.pretrained_accuracy()
    if cfg.dpo_data:  # the user's (chosen, rejected) renderings replace the policy's graded answers
        _, prefs = split_records(read_user_data(cfg.dpo_data, on_error="skip"))
        pairs = preference_pairs(prefs, tok, run.post_processor, max_tokens=tc.seq_len, on_error="skip")
        own, source = 0.0, f"from {cfg.dpo_data}"
    else:
        generator = run.generator()
        was_training = model.training
        model.eval()

        def graded_pairs(block, start):  # rows seeded as one process seeds them
            rollouts = sample_rollouts(generator, tok, block, group_size=cfg.dpo_samples,
                                       max_new_tokens=cfg.answer_tokens, seed=tc.seed + 1 + start * cfg.dpo_samples,
                                       image_processor=run.post_processor)
            return [dpo_pairs(rollouts, tok, run.post_processor)]

        parts = run.share(graded_pairs, run.train_problems(cfg.dpo_problems, seed_offset=1))
        model.train(was_training)
        pairs = [p for part, _ in parts for p in part]
        own = sum(round(share * len(part)) for part, share in parts) / max(len(pairs), 1)
        pairs = [p for p in pairs if len(p[0]) + max(len(p[1]), len(p[2])) <= tc.seq_len]
        source = f"{own:.0%} with the policy's own right answer as chosen"
    if not pairs:
        raise ValueError(f"dpo: no preference pairs in {cfg.dpo_data}" if cfg.dpo_data else
                         "dpo: no preference pairs (every sampled answer was right, or too long for --seq_len)")
    if run.rank == 0:
        print(f"[dpo] {len(pairs)} preference pairs, {source}")
    world = run.world_size
    if len(pairs) < world:
        raise ValueError(f"dpo: {len(pairs)} preference pair(s) for {world} processes, which need one each at "
                         "least; give more pairs (--dpo_data, --dpo_problems) or run fewer processes")
    size = cfg.dpo_pairs * world  # a global batch; each rank trains on its block
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    if len(chunks[-1]) < world:  # too few to give every rank a pair: the last batch joins the one before
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    chunks = [chunk[slice(*block(len(chunk), run.rank, world))] for chunk in chunks]
    batches = [PreferenceBatch(answer_rows([c for c, _ in chunk] + [r for _, r in chunk], tok.pad_id))
               if cfg.dpo_data else preference_rows(chunk, tok.pad_id) for chunk in chunks]
    for b in batches:
        if b.batch.pixel_values is None and run.empty_tiles is not None:
            b.batch.pixel_values = torch.zeros(0, *run.empty_tiles)
    loss = DPOLoss(cfg.dpo_beta, cfg.dpo_nll_weight, reference=run.frozen_copy())

    def evaluate(model):
        run.task_accuracy["dpo"] = run.task_eval(model)
        return {**run.task_accuracy["dpo"], "pairs": len(pairs), "own_chosen": own}

    return Stage("dpo", run.stage_config(cfg.dpo_steps, cfg.dpo_lr, balance="none"),
                 PairBatches(batches), loss, ("",), evaluate)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


RECIPES: dict[str, Callable[[Run], Stage | None]] = {
    "contrastive": contrastive, "text": text, "align": align, "joint": joint, "sft": sft, "rl": rl, "dpo": dpo}
POST_TRAINING = (sft, rl, dpo)  # before the first of these, `herd train` keeps the pretrained model as <out>/base


# ------------------------------------------------------------------------------------------------
# Running one
# ------------------------------------------------------------------------------------------------

def estimate_seconds(run: Run, stage: Stage) -> float:
    """Training flops per token x tokens / (measured peak x TYPICAL_MFU)."""
    c = stage.config
    tokens = c.steps * c.grad_accum * c.batch_size * c.seq_len * run.world_size
    return run.flops_per_token * tokens / (run.peak_flops * run.world_size * TYPICAL_MFU)


def run_stage(run: Run, stage: Stage) -> None:
    """Freezes all but the stage's trainable weights, trains (or resumes) it, records the result."""
    main = run.rank == 0
    if stage.decoder_rows:
        run.estimates[stage.name] = estimate_seconds(run, stage)
        if main:
            c = stage.config
            print(f"[{stage.name}] {c.steps} steps x {c.grad_accum * c.batch_size * c.seq_len * run.world_size:,} "
                  f"tokens: about {run.estimates[stage.name] / 60:.1f} min (estimated: "
                  f"{run.flops_per_token / 1e6:.0f} MFLOP/token at {TYPICAL_MFU:.0%} of the measured peak)")
    for name, p in run.model.named_parameters():
        p.requires_grad_(name.startswith(stage.trainable))
    start = time.perf_counter()
    result = train(run.model, stage.config, stage.data, stage.loss, run.out, stage=stage.name,
                   evaluate=stage.evaluate, checkpointer=run.checkpointer_for(stage.name),
                   flops_per_token=run.flops_per_token if stage.decoder_rows else None, peak_flops=run.peak_flops,
                   on_step=stage.on_step)
    run.timings[stage.name] = time.perf_counter() - start
    run.results[stage.name] = {"loss": result.loss, **result.eval}
    run.trained_on_images |= stage.images

