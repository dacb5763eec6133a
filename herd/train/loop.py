"""The training loop: the only one in herd. Recipes supply the data and the loss.

    for step in range(start, steps):
        step hooks(StepContext)                             (rollouts, reference refresh, schedules)
        grad_accum micro-batches: loss_sum.backward()       (+ aux load-balancing loss if chosen)
        grads *= world / global target count                (exact mean over micro-batches and ranks)
        loss and metric sums / counts, summed over micro-batches and ranks, divided once
        skip the step if the loss or gradient norm is NaN/inf; stop after max_bad_steps in a row
        clip, schedule the lr, AdamW step, update the MoE selection biases
        every sync_inference_every steps: refresh the decode-ready inference copy
        log, evaluate and checkpoint on their schedules

Everything else comes from outside: `data` is an iterator of `Batch`es with `state_dict()` /
`load_state_dict()` (its position is part of the checkpoint); `loss_fn(model, batch)` returns a
`LossOutput` (a sum, a count, and metrics as sums and counts) and may itself be a module with
parameters (they are trained and checkpointed too). Models the loss only reads (a teacher, a
reference) sit in `loss_fn.frozen`, a name -> module dict: the loop puts them in eval mode without
gradients, and they are neither optimised nor written into checkpoints; under FSDP the recipe
parallelises them as it does the model. The step hooks are `loss_fn.on_step` (if the loss has one:
e.g. a schedule over training) and the `on_step` argument, whose `state_dict()` if any is part of
the checkpoint. `evaluate(model)` returns validation metrics; the checkpointer decides the on-disk
format (one process: Hugging Face layout; distributed: sharded). Parallelism is applied to the
model before it gets here, and a run folder with checkpoints resumes where it stopped.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from .balance import LoadBalancer
from .checkpoint import LocalCheckpointer, check_writable
from .config import TrainConfig
from .losses import Batch, LossOutput
from .memory import keep_freed_memory
from .metap import lr_multipliers
from .metrics import MetricsLog
from .optim import build_optimizer, set_lr


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient; the last good checkpoint is kept."""


class DataSource(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StepContext:
    """What a step hook sees, once per optimiser step before its micro-batches."""

    step: int  # the step about to run (0-based)
    steps: int  # total steps of this loop
    model: nn.Module  # the trained model
    frozen: dict[str, nn.Module]  # the loss's frozen models (teacher, reference)
    inference: nn.Module | None  # the decode-ready copy (cfg.sync_inference_every > 0), else None


StepHook = Callable[[StepContext], None]


class InferenceCopy:
    """A decode-ready copy of the trained model, for generating inside training (RL rollouts):
    `herd.inference.prepare_for_decoding` applied to a plain copy of the current weights. The fused
    layouts differ from the trained ones, so `sync` rebuilds the copy rather than copying tensor by
    tensor. Under FSDP every rank gathers the full weights (a collective: every rank syncs) and
    generates alone. `decode_ready=False` keeps the plain copy (an unsharded `Llama4` in eval mode:
    the post-training recipes generate with it under torchrun and shard a frozen reference from it)."""

    def __init__(self, model: nn.Module, decode_ready: bool = True):
        self.model: nn.Module | None = None
        self.decode_ready = decode_ready
        self.sync(model)

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        from ..inference import prepare_for_decoding
        from ..model import Llama4
        from ..model.moe import MoE

        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                 for k, v in model.state_dict().items()}
        with torch.device("meta"):
            plain = Llama4(model.config)
        plain.load_state_dict(state, assign=True)
        # route as the trained model does now, selection biases included
        for src, dst in zip((m for m in model.modules() if isinstance(m, MoE)),
                            (m for m in plain.modules() if isinstance(m, MoE))):
            dst.selection_bias = None if src.selection_bias is None else src.selection_bias.clone()
        self.model = prepare_for_decoding(plain.eval()) if self.decode_ready else plain.eval()


@dataclass
class TrainResult:
    step: int
    loss: float  # mean training loss of the last step
    eval: dict = field(default_factory=dict)  # the last evaluation
    resumed_from: int | None = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def reshard(model: nn.Module) -> None:
    """Under FSDP2 a forward without backward (an evaluation) leaves the root unit's weights (the
    embeddings, final norm, lm_head) gathered, and `named_parameters()` then yields the gathered
    copies: frozen or optimised, they would not be the shards that train. This puts the shards back."""
    if hasattr(model, "reshard"):
        model.reshard()


def train(model: nn.Module, cfg: TrainConfig, data: DataSource | Iterator[Batch],
          loss_fn: Callable[[nn.Module, Batch], LossOutput], run_dir: str | Path, *, stage: str = "train",
          evaluate: Callable[[nn.Module], dict] | None = None, checkpointer=None,
          metrics: MetricsLog | None = None, flops_per_token: float | None = None,
          peak_flops: float | None = None, on_step: StepHook | None = None) -> TrainResult:
    """Trains `model` for `cfg.steps` optimiser steps, resuming from the newest checkpoint of
    `stage` in `run_dir` if there is one. Returns the final step, loss and evaluation."""
    rank, world = _world()
    run_dir = Path(run_dir)
    if rank == 0:
        check_writable(run_dir)  # fail now, not at the first checkpoint
    checkpointer = checkpointer or LocalCheckpointer(run_dir / "checkpoints" / stage, cfg.keep_checkpoints)
    metrics = metrics or MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)
    device = next(model.parameters()).device
    keep_freed_memory()  # each step's large tensors reuse the last step's memory instead of faulting it in

    # ---- features applied from outside the model, before the optimiser sees the parameters
    reshard(model)  # the optimiser must hold the shards, whatever forward ran before
    if cfg.fp8:
        from .fp8 import convert_to_float8

        convert_to_float8(model)
    if cfg.activation_checkpointing:
        from .recompute import checkpoint_activations

        checkpoint_activations(model)
    balancer = LoadBalancer(model, cfg.balance, cfg.bias_rate, cfg.aux_weight)
    frozen: dict[str, nn.Module] = dict(getattr(loss_fn, "frozen", {}))
    for frozen_model in frozen.values():  # read by the loss, never trained (a dict, so no submodule)
        frozen_model.eval().requires_grad_(False)
    hooks = [hook for hook in (getattr(loss_fn, "on_step", None), on_step) if hook is not None]
    extra = list(loss_fn.named_parameters(prefix="loss")) if isinstance(loss_fn, nn.Module) else []
    lr_mults = lr_multipliers(model, cfg.base_width, cfg.base_depth) if cfg.metap else None
    optimizer = build_optimizer(list(model.named_parameters()) + extra, cfg, lr_mults)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward_model = torch.compile(model) if cfg.compile else model

    # ---- resume
    start, resumed_from = 0, None
    latest = checkpointer.latest()
    if latest is not None:
        state = checkpointer.load(latest, model, optimizer)
        start = resumed_from = state["step"]
        if hasattr(data, "load_state_dict"):
            data.load_state_dict(state["data"])
        balancer.load_state_dict(state.get("balancer", {}))
        if extra:
            loss_fn.load_state_dict(state["loss_fn"])
        if hasattr(on_step, "load_state_dict"):
            on_step.load_state_dict(state["on_step"])
        if rank == 0:
            print(f"[{stage}] resumed from {latest} (step {start})")

    def save(step: int):
        state = {"data": data.state_dict() if hasattr(data, "state_dict") else {},
                 "balancer": balancer.state_dict(), "stage": stage}
        if extra:
            state["loss_fn"] = loss_fn.state_dict()
        if hasattr(on_step, "state_dict"):
            state["on_step"] = on_step.state_dict()
        checkpointer.save(step, model, optimizer, state)

    def run_eval(step: int) -> dict:
        if evaluate is None:
            return {}
        model.eval()
        with torch.no_grad():
            result = evaluate(model)
        model.train()
        reshard(model)  # so that the next stage freezes and optimises the shards
        metrics.write({"stage": stage, "step": step, "kind": "eval", **result})
        return result

    inference = InferenceCopy(model) if cfg.sync_inference_every else None

    bar = tqdm(total=cfg.steps, initial=start, desc=stage, disable=not cfg.progress or rank != 0,
               dynamic_ncols=True, leave=True)
    model.train()
    bad_in_a_row, loss_value, last_eval = 0, float("nan"), {}
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        # ---- once per step, before its micro-batches
        context = StepContext(step, cfg.steps, model, frozen, inference.model if inference else None)
        for hook in hooks:
            hook(context)

        # ---- forward and backward over the micro-batches of this step
        loss_sum, count, n_tokens = 0.0, 0, 0
        metric_sums: dict[str, list[float]] = {}  # name -> [sum, count]
        for micro in range(cfg.grad_accum):
            batch = next(data).to(device)
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce gradients once, at the end
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            out = loss_fn(forward_model, batch)
            loss = out.loss_sum
            aux = balancer.aux_loss(out.router)
            if aux is not None:  # weighted by targets, so after the division below it is a mean
                loss = loss + aux * out.count
            loss.backward()
            balancer.observe(out.router)
            loss_sum += out.loss_sum.item()
            count += out.count
            n_tokens += batch.input_ids.numel()
            for name, (value, n) in out.metrics.items():
                total = metric_sums.setdefault(name, [0.0, 0.0])
                total[0] += float(value)
                total[1] += float(n)
        names = sorted(metric_sums)  # every rank's loss reports the same names
        totals = _all_sum([loss_sum, count, n_tokens] + [x for name in names for x in metric_sums[name]])
        loss_sum, count, n_tokens = totals[:3]
        loss_value = loss_sum / max(count, 1)
        step_metrics = {name: totals[3 + 2 * i] / max(totals[4 + 2 * i], 1e-12) for i, name in enumerate(names)}
        scale = world / max(count, 1)  # FSDP averages gradients over ranks; undo that, divide by count
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

        # ---- a NaN/inf step changes nothing; too many in a row stop the run
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            balancer.step()  # discard this step's counts
            bad_in_a_row += 1
            warnings.warn(f"[{stage}] step {step}: loss {loss_value}, grad norm {grad_norm}; step skipped "
                          f"({bad_in_a_row}/{cfg.max_bad_steps} in a row)", RuntimeWarning, stacklevel=2)
            if bad_in_a_row >= cfg.max_bad_steps:
                bar.close()
                latest = checkpointer.latest()
                raise TrainingDiverged(
                    f"[{stage}] {bad_in_a_row} consecutive steps had a NaN/inf loss or gradient (last at step "
                    f"{step}); stopping. The last good checkpoint is {latest}. Lower --lr or raise --warmup_steps")
            continue
        bad_in_a_row = 0
        lr = set_lr(optimizer, step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        load = balancer.step()
        done = step + 1
        if inference is not None and done % cfg.sync_inference_every == 0:
            inference.sync(model)

        # ---- logging, evaluation, checkpoints
        window_tokens += n_tokens
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / max(elapsed, 1e-9)
            record = {"stage": stage, "step": done, "kind": "train", "loss": loss_value, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tok_s, "time": time.time(), **step_metrics}
            if flops_per_token and peak_flops:
                record["mfu"] = tok_s * flops_per_token / (peak_flops * world)
            if balancer.layers and load.sum() > 0:  # stages that never route (contrastive) log none
                record["expert_load"] = load.tolist()
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            window_tokens, window_start = 0, time.perf_counter()
        pause_start = time.perf_counter()  # evaluation and checkpoints do not count as throughput
        if done % cfg.eval_every == 0 or done == cfg.steps:
            last_eval = run_eval(done)
            if "loss" in last_eval and rank == 0:
                bar.write(f"[{stage}] step {done}: val loss {last_eval['loss']:.3f}"
                          + (f", {last_eval['bpb']:.3f} bits/byte" if "bpb" in last_eval else ""))
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save(done)
        window_start += time.perf_counter() - pause_start
        bar.update(1)
    bar.close()
    if start >= cfg.steps and evaluate is not None:  # resumed after the end: report the final state
        last_eval = run_eval(cfg.steps)
    return TrainResult(step=cfg.steps, loss=loss_value, eval=last_eval, resumed_from=resumed_from)
