"""Codistillation's loss (herd/train/distill.py): its limits, its formula by hand, where gradients
go, and a run through the training loop with a frozen and with a training teacher."""

import json
import math

import pytest
import torch

import herd
from herd.hf import save_pretrained
from herd.train.config import TrainConfig
from herd.train.distill import DistillationLoss, load_teacher
from herd.train.loop import StepContext, train
from herd.train.losses import IGNORE, causal_lm_loss
from tests.test_train import cfg, small_model, token_data


def batch():
    return next(token_data(batch=2))


def test_zero_soft_weight_is_plain_cross_entropy():
    student, teacher, b = small_model(), small_model(seed=1, hidden_size=48), batch()
    plain = causal_lm_loss(student, b)
    for loss in (DistillationLoss(teacher, weighting="fixed", alpha=0.0),
                 DistillationLoss(teacher, weighting="dynamic", alpha=0.0, alpha_end=0.0)):
        out = loss(student, b)
        assert out.count == plain.count
        torch.testing.assert_close(out.loss_sum, plain.loss_sum, rtol=1e-6, atol=1e-5)


def hand_kl(student_logits, teacher_logits, tau):
    """sum_v p_v (log p_v - log q_v) at temperature tau, in float64, one row at a time."""
    out = []
    for s, t in zip(student_logits.double(), teacher_logits.double()):
        p = [math.exp(x / tau) for x in t.tolist()]
        q = [math.exp(x / tau) for x in s.tolist()]
        zp, zq = sum(p), sum(q)
        out.append(sum(pv / zp * (math.log(pv / zp) - math.log(qv / zq)) for pv, qv in zip(p, q)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_soft_target_is_the_temperature_scaled_kl(tau):
    student, teacher, b = small_model(), small_model(seed=1, hidden_size=48), batch()
    mask = b.labels != IGNORE
    with torch.no_grad():
        s, t = student(b.input_ids, document_ids=b.document_ids).logits[mask], \
            teacher(b.input_ids, document_ids=b.document_ids).logits[mask]
        ce = torch.nn.functional.cross_entropy(s.double(), b.labels[mask], reduction="none")
    kl = hand_kl(s, t, tau)
    fixed = DistillationLoss(teacher, temperature=tau, weighting="fixed", alpha=0.3)(student, b)
    expected = (0.3 * tau**2 * kl + 0.7 * ce).sum()
    assert fixed.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert fixed.metrics["soft_loss"][0].item() == pytest.approx(tau**2 * kl.sum().item(), rel=1e-4)

    # dynamic: the schedule at 3/4 of training times the teacher's confidence, per token
    dynamic = DistillationLoss(teacher, temperature=tau, weighting="dynamic", alpha=0.9, alpha_end=0.1)
    dynamic.on_step(StepContext(step=6, steps=9, model=student, frozen={}, inference=None))
    p = torch.softmax(t.double(), -1)
    confidence = 1 - (-(p * p.log()).sum(-1)) / math.log(t.shape[-1])
    w = (0.9 + (0.1 - 0.9) * 0.75) * confidence
    out = dynamic(student, b)
    assert out.loss_sum.item() == pytest.approx((w * tau**2 * kl + (1 - w) * ce).sum().item(), rel=1e-5)
    assert out.metrics["soft_weight"][0].item() == pytest.approx(w.sum().item(), rel=1e-5)


def test_gradient_reaches_only_the_student():
    student, teacher, b = small_model(), small_model(seed=1, hidden_size=48), batch()
    teacher.requires_grad_(True)  # even a teacher left trainable gets nothing from the loss
    DistillationLoss(teacher, alpha=0.9)(student, b).loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for n, p in student.named_parameters() if "experts" not in n)

    # codistillation: the teacher trains, on its own hard targets only (the soft target is detached)
    student.zero_grad()
    DistillationLoss(teacher, alpha=0.9, train_teacher=True)(student, b).loss_sum.backward()
    got = {n: p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None}
    teacher.zero_grad()
    causal_lm_loss(teacher, b).loss_sum.backward()
    for n, p in teacher.named_parameters():
        if p.grad is not None:
            # float tolerance: causal_lm_loss takes the chunked head loss, the distillation whole logits
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-5)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    student = small_model()
    save_pretrained(small_model(vocab_size=80), tmp_path / "teacher")
    with pytest.raises(ValueError, match="vocab_size=80 but the student has 64.*tokenizer"):
        load_teacher(tmp_path / "teacher", student)
    with pytest.raises(ValueError, match="vocabulary \\(80\\) differs from the student's \\(64\\)"):
        DistillationLoss(herd.from_pretrained(tmp_path / "teacher"))(student, batch())
    save_pretrained(small_model(seed=2, hidden_size=48), tmp_path / "good")
    assert load_teacher(tmp_path / "good", student).config.text.hidden_size == 48


def records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_distillation_through_the_loop(tmp_path):
    teacher = small_model(seed=1, hidden_size=48)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    c = cfg(steps=4, distill_weighting="dynamic", distill_alpha=0.9, distill_alpha_end=0.1)
    train(small_model(), c, token_data(), DistillationLoss.from_config(teacher, c), tmp_path / "frozen")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    logged = records(tmp_path / "frozen")
    for key in ("hard_loss", "soft_loss", "soft_weight", "teacher_confidence", "teacher_loss"):
        assert all(math.isfinite(r[key]) for r in logged), key
    weights = [r["soft_weight"] / r["teacher_confidence"] for r in logged]  # the schedule alone (~, per token)
    assert weights[0] > 0.8 and weights[-1] < 0.2  # falls from alpha to alpha_end over training
    assert not (tmp_path / "frozen" / "checkpoints" / "train" / "step_000004" / "teacher").exists()

    # codistillation: the teacher trains beside the student and is checkpointed with the loss
    c = TrainConfig(**(vars(c) | {"train_teacher": True}))
    loss = DistillationLoss.from_config(teacher, c)
    train(small_model(), c, token_data(), loss, tmp_path / "codistill")
    assert not all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    logged = records(tmp_path / "codistill")
    assert logged[-1]["teacher_loss"] < logged[0]["teacher_loss"]
    state = torch.load(tmp_path / "codistill" / "checkpoints" / "train" / "step_000004" / "trainer.pt",
                       weights_only=False)
    assert any(k.startswith("teacher.") for k in state["loss_fn"])


def tokenizer_and_teacher(folder) -> tuple[str, str]:
    """A small tokenizer (folder/tok) and a `tiny` teacher with its vocabulary (folder/teacher)."""
    from herd.data.corpora import stdlib_texts
    from herd.model import Llama4
    from herd.pipeline import model_config_for
    from herd.tokenizer import Tokenizer, train_tokenizer

    train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=100_000)], num_bpe_ranks=300).save(folder / "tok")
    torch.manual_seed(1)
    save_pretrained(Llama4(model_config_for("tiny", Tokenizer.from_dir(folder / "tok"))), folder / "teacher")
    return f"--tokenizer={folder / 'tok'}", f"--teacher={folder / 'teacher'}"


def test_herd_train_distils_text_and_joint_from_a_teacher_checkpoint(tmp_path):
    """`herd train --teacher=DIR`: the text and joint stages learn from the teacher's distribution
    (the terms are logged), and the teacher is neither optimised nor written into checkpoints."""
    from herd.cli import main
    from herd.train.recipes import TEXT_TOWER

    options = tokenizer_and_teacher(tmp_path)
    teacher_files = {p.name: p.read_bytes() for p in (tmp_path / "teacher").iterdir()}
    out = tmp_path / "run"
    assert main(["train", "smoke", "--stages=text,joint", "--images=3", "--code_bytes=100000",
                 *options, f"--out={out}"]) == 0

    logged = records(out)
    assert {r["stage"] for r in logged} == {"text", "joint"}
    for r in logged:
        assert r["soft_weight"] == pytest.approx(0.9)  # the default: a fixed weight on the soft target
        assert all(math.isfinite(r[k]) for k in ("hard_loss", "soft_loss", "teacher_confidence", "teacher_loss"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "teacher").iterdir()} == teacher_files
    for stage, trainable in (("text", TEXT_TOWER), ("joint", ("",))):
        ckpt = max((out / "checkpoints" / stage).glob("step_*"))
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        student = herd.from_pretrained(ckpt / "model")
        learning = [n for n, _ in student.named_parameters() if n.startswith(trainable)]
        assert "loss_fn" not in state and len(state["optimizer"]["state"]) == len(learning), stage
        # the teacher has the student's shape: the same tensor names, nothing of the teacher's added
        assert sorted(safe_open_keys(ckpt / "model")) == sorted(safe_open_keys(tmp_path / "teacher")), stage


def safe_open_keys(folder) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as file:
            keys += list(file.keys())
    return keys


def test_joint_distillation_needs_a_teacher_that_reads_images(tmp_path):
    import dataclasses

    from herd.train.config import smoke
    from herd.train.recipes import Run

    save_pretrained(small_model(seed=1), tmp_path / "teacher")  # text only
    cfg = smoke()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher=str(tmp_path / "teacher")))
    run = Run(cfg, tmp_path, None, small_model(), [], [], 1.0)
    assert isinstance(run.lm_loss(), DistillationLoss)
    with pytest.raises(ValueError, match="no vision tower"):
        run.lm_loss(images=True)
