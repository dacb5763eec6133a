"""The training loop: configs and overrides, schedules, exact resume, NaN handling, checkpoint errors."""

import dataclasses
import errno
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from herd.config import ModelConfig, TextConfig
from herd.data.documents import Document
from herd.data.packing import PackedLoader
from herd.model import Llama4
from herd.train import checkpoint as ckpt_module
from herd.train.checkpoint import CheckpointWriteError, step_dirs
from herd.train.config import TrainConfig, apply_overrides, default, parse_overrides
from herd.train.loop import TrainingDiverged, train
from herd.train.losses import causal_lm_loss
from herd.train.optim import lr_factor


def small_model(seed=0, **text) -> Llama4:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_chunk_size=8,
               num_local_experts=4, interleave_moe_layer_step=2, floor_scale=8, bos_token_id=0, eos_token_id=1,
               pad_token_id=2, rope_theta=10000.0)
    torch.manual_seed(seed)
    return Llama4(ModelConfig(text=TextConfig(**(cfg | text)), vision=None))


def token_data(seed=0, batch=4, seq=16) -> PackedLoader:
    g = torch.Generator().manual_seed(123)
    # learnable documents: a repeated pattern with noise, each closed by the end-of-text id 1
    docs = [((torch.arange(40) * 7 + i) % 50 + 3 + (torch.rand(40, generator=g) < 0.1) * 5).tolist() + [1]
            for i in range(30)]
    docs = [Document(np.array(d), np.ones(len(d), dtype=bool)) for d in docs]
    return PackedLoader(docs, seq_len=seq, batch_size=batch, pad_id=2, seed=seed)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=8, lr=1e-2, warmup_steps=2, eval_every=100, ckpt_every=3, log_every=1, progress=False)
    return TrainConfig(**(base | kw))


def train_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def test_overrides_parse_types_and_reject_typos():
    c = apply_overrides(default(), parse_overrides(["--lr=1e-4", "--steps", "12", "--fp8", "--out=x",
                                                    "--balance=aux"]))
    assert (c.train.lr, c.train.steps, c.train.fp8, c.out, c.train.balance) == (1e-4, 12, True, "x", "aux")
    with pytest.raises(ValueError, match="unknown setting --lrr.*valid keys:.*lr"):
        apply_overrides(default(), {"lrr": "1"})
    with pytest.raises(ValueError, match="--steps expects an integer"):
        apply_overrides(default(), {"steps": "many"})
    with pytest.raises(ValueError, match="schedule must be one of"):
        apply_overrides(default(), {"schedule": "linear"})


def test_cli_rejects_typo(capsys):
    from herd.cli import main

    assert main(["train", "--stepz=3"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_schedules():
    c = cfg(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(99, c) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(10, c) > lr_factor(50, c) > lr_factor(90, c)
    w = dataclasses.replace(c, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, w) == lr_factor(79, w) == 1.0
    assert lr_factor(90, w) == pytest.approx(0.55) and lr_factor(100, w) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# Learning, resuming, faults
# ------------------------------------------------------------------------------------------------

def test_loss_falls(tmp_path):
    model = small_model()
    train(model, cfg(steps=30), token_data(), causal_lm_loss, tmp_path)
    losses = train_losses(tmp_path)
    assert losses[30] < losses[1] - 1.0


class Killed(Exception):
    pass


class KillAt:
    """Wraps a data source and 'kills the process' when batch number `at` is requested."""

    def __init__(self, data, at):
        self.data, self.at, self.served = data, at, 0

    def __next__(self):
        if self.served == self.at:
            raise Killed
        self.served += 1
        return next(self.data)

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, s):
        self.data.load_state_dict(s)


@pytest.mark.parametrize("balance,accum", [("bias", 1), ("aux", 2)])
def test_resume_reproduces_uninterrupted_losses(tmp_path, balance, accum):
    c = cfg(balance=balance, grad_accum=accum, bias_rate=0.05)
    train(small_model(), c, token_data(), causal_lm_loss, tmp_path / "straight")
    with pytest.raises(Killed):  # dies during step 5 (checkpoint at 3), before step 5's checkpoint
        train(small_model(), c, KillAt(token_data(), at=5 * accum), causal_lm_loss, tmp_path / "killed")
    assert [p.name for p in step_dirs(tmp_path / "killed" / "checkpoints" / "train")] == ["step_000003"]
    # a fresh process: a different init and RNG, everything must come from the checkpoint
    torch.manual_seed(999)
    result = train(small_model(seed=5), c, token_data(), causal_lm_loss, tmp_path / "killed")
    assert result.resumed_from == 3
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    for step in range(4, 9):
        assert resumed[step] == straight[step], step


def test_nan_steps_are_skipped_then_stop_the_run(tmp_path):
    model = small_model()
    calls = {"n": 0}

    def flaky_loss(m, batch):
        calls["n"] += 1
        out = causal_lm_loss(m, batch)
        if calls["n"] == 2 or calls["n"] >= 5:  # one bad step, recovery, then bad for good
            out.loss_sum = out.loss_sum * float("nan")
        return out

    with pytest.warns(RuntimeWarning, match="step skipped"), pytest.raises(TrainingDiverged, match="step_000003"):
        train(model, cfg(ckpt_every=3, max_bad_steps=3), token_data(), flaky_loss, tmp_path)
    # the last good checkpoint (step 3) is intact and loadable
    ckpts = step_dirs(tmp_path / "checkpoints" / "train")
    assert [p.name for p in ckpts] == ["step_000003"]
    state = torch.load(ckpts[0] / "trainer.pt", weights_only=False)
    assert state["step"] == 3
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses.values()) and 2 not in losses  # step 2 was skipped


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    c = cfg(steps=6, ckpt_every=3)
    real_save = torch.save

    def fail_second(obj, path, *a, **k):
        if "step_000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_module.torch, "save", fail_second)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint is intact"):
        train(model, c, token_data(), causal_lm_loss, tmp_path)
    folder = tmp_path / "checkpoints" / "train"
    assert [p.name for p in folder.iterdir()] == ["step_000003"]  # no partial step_000006, no temp folder


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match="not writable"):
        ckpt_module.check_writable(blocker / "run")


# ------------------------------------------------------------------------------------------------
# Speed without changing the arithmetic
# ------------------------------------------------------------------------------------------------

def test_foreach_adamw_takes_the_same_steps_as_the_per_parameter_loop():
    from herd.train.optim import build_optimizer

    models = [small_model(), small_model()]
    fast, loop = (build_optimizer(list(m.named_parameters()), cfg()) for m in models)
    assert all(group["foreach"] for group in fast.param_groups)
    for group in loop.param_groups:
        group["foreach"] = False
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model in models:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
        fast.step()
        loop.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    """A freed 64 MiB tensor's memory serves the next one (in a fresh process: the setting is
    process-wide and the trainer already applied it to this one)."""
    code = """if True:
        import resource, torch
        from herd.train.memory import keep_freed_memory
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                torch.ones(16, 2**20)  # 64 MiB, touched and freed
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        plain = faults()
        kept = keep_freed_memory()
        faults()  # the heap grows once to hold the block
        print(plain, kept, faults())"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    plain, kept, after = int(out[0]), out[1] == "True", int(out[2])
    if not kept:
        pytest.skip("this C library has no working mallopt")
    assert plain > 4 * 16 * 2**20 // 4096 // 2  # about one fault per page each time, as the docstring says
    assert after < plain / 20


# ------------------------------------------------------------------------------------------------
# Post-training features: frozen models, metrics, step hooks, the inference copy
# ------------------------------------------------------------------------------------------------

def labelled_loss(model, batch):
    """Cross-entropy that also reports the mean target id and the targets per step: metrics whose
    correct value (sums over micro-batches and ranks, divided once) is known from the data alone:
    targets per micro-batch, and the mean target id over the whole step."""
    out = causal_lm_loss(model, batch)
    targets = batch.labels[batch.labels != -100]
    out.metrics = {"mean_target": (targets.sum().float(), len(targets)), "targets": (len(targets), 1)}
    return out


def test_metrics_are_summed_over_micro_batches_before_dividing(tmp_path):
    train(small_model(), cfg(steps=3, grad_accum=3), token_data(), labelled_loss, tmp_path)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    data = token_data()
    batches = [next(data) for _ in range(9)]
    for step in range(1, 4):
        labels = torch.cat([batches[3 * (step - 1) + micro].labels.flatten() for micro in range(3)])
        labels = labels[labels != -100]
        assert records[step]["targets"] == pytest.approx(len(labels) / 3)
        assert records[step]["mean_target"] == pytest.approx(labels.double().mean().item(), rel=1e-9)


class WithReference:
    """A loss reading a frozen reference model (as DPO's or a KL penalty's would)."""

    def __init__(self, reference):
        self.frozen = {"reference": reference}
        self.modes = []

    def __call__(self, model, batch):
        out = causal_lm_loss(model, batch)
        ref = self.frozen["reference"]
        self.modes.append((ref.training, torch.is_grad_enabled()))
        ref_logits = ref(batch.input_ids, document_ids=batch.document_ids).logits
        # the reference stays in the graph: if the loop let it train, it would get gradients
        out.loss_sum = out.loss_sum + 0.1 * (out.count * ref_logits.float().pow(2).mean())
        return out


def test_frozen_models_are_neither_trained_nor_saved(tmp_path):
    model, reference = small_model(), small_model(seed=3)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    loss = WithReference(reference)
    train(model, cfg(steps=4, ckpt_every=2), token_data(), loss, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert {mode for mode, _ in loss.modes} == {False}  # eval mode for every call
    ckpt = step_dirs(tmp_path / "checkpoints" / "train")[-1]
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert "loss_fn" not in state  # nothing of the reference in the trainer state
    assert len(state["optimizer"]["state"]) == sum(1 for _ in model.parameters())  # the model's, only


class CountingHook:
    """A per-step hook with state: the (step, data position) of every call."""

    def __init__(self, data):
        self.data, self.seen = data, []

    def __call__(self, context):
        taken = self.data.epoch * self.data.batches_per_epoch() + self.data.batch  # batches drawn so far
        self.seen.append((context.step, taken))

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])


def test_step_hook_runs_before_the_micro_batches_and_resumes_its_state(tmp_path):
    c = cfg(grad_accum=2)
    data = token_data()
    straight = CountingHook(data)
    train(small_model(), c, data, causal_lm_loss, tmp_path / "straight", on_step=straight)
    assert straight.seen == [(step, 2 * step) for step in range(8)]  # once per step, before its batches
    with pytest.raises(Killed):
        killed_data = token_data()
        train(small_model(), c, KillAt(killed_data, at=10), causal_lm_loss, tmp_path / "killed",
              on_step=CountingHook(killed_data))
    data = token_data()
    resumed = CountingHook(data)
    train(small_model(), c, data, causal_lm_loss, tmp_path / "killed", on_step=resumed)
    assert resumed.seen == straight.seen  # steps 0-2 from the checkpoint, 3-7 from this run


def test_inference_copy_is_decode_ready_and_synced_every_n_steps(tmp_path):
    ids = torch.randint(3, 60, (1, 12))
    seen = []

    def hook(context):
        with torch.no_grad():
            seen.append((context.step, context.inference, context.inference(ids).logits,
                         context.model(ids).logits))

    model = small_model()
    train(model, cfg(steps=6, sync_inference_every=2), token_data(), causal_lm_loss, tmp_path, on_step=hook)
    for step, copy, copy_logits, model_logits in seen:
        assert copy.decode_ready and copy is not model
        if step % 2 == 0:  # synced after the previous step (and before the first)
            torch.testing.assert_close(copy_logits, model_logits, rtol=1e-4, atol=1e-4)
        else:  # one step stale: still the copy of the step before
            assert copy is seen[step - 1][1]
            assert not torch.allclose(copy_logits, model_logits, atol=1e-4)
    assert len({id(copy) for _, copy, _, _ in seen}) == 3


def test_activation_checkpointing_gives_the_same_losses_and_keys(tmp_path):
    from herd.train.recompute import checkpoint_activations

    model, recomputed = small_model(), small_model()
    assert checkpoint_activations(recomputed) == 2
    assert list(recomputed.state_dict()) == list(model.state_dict())  # names unchanged
    batch = next(token_data())
    calls = {id(model): 0, id(recomputed): 0}
    for m in (model, recomputed):
        m.layers[0].self_attn.register_forward_hook(lambda *_, key=id(m): calls.__setitem__(key, calls[key] + 1))
        causal_lm_loss(m, batch).loss_sum.backward()
    assert (calls[id(model)], calls[id(recomputed)]) == (1, 2)  # recomputed in backward
    for (name, a), b in zip(model.named_parameters(), recomputed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    train(small_model(), cfg(steps=3), token_data(), causal_lm_loss, tmp_path / "plain")
    train(small_model(), cfg(steps=3, activation_checkpointing=True), token_data(), causal_lm_loss, tmp_path / "ckpt")
    assert train_losses(tmp_path / "ckpt") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)
