"""FP8 training: float8 matmuls (torch._scaled_mm on CPU) match fp32 closely, and so does training."""

import statistics

import torch

from herd.model.moe import Experts
from herd.train.fp8 import Float8Experts, Float8Linear, convert_to_float8, float8_matmul
from herd.train.loop import train
from herd.train.losses import causal_lm_loss
from tests.test_train import cfg, small_model, token_data, train_losses

# Stated tolerance: the mean training loss over the last 10 of 40 steps within 2% of fp32's.
FP8_LOSS_TOLERANCE = 0.02


def test_float8_matmul_and_gradients_are_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, requires_grad=True)
    w = torch.randn(96, 48, generator=g, requires_grad=True)
    y8 = float8_matmul(x, w)
    y = x @ w
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 1e-4 < rel(y8, y) < 0.05  # really quantised, and close
    grad = torch.randn(64, 48, generator=g)
    gx8, gw8 = torch.autograd.grad(y8, (x, w), grad)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    assert rel(gx8, gx) < 0.1 and rel(gw8, gw) < 0.1  # e5m2 gradients: 2 mantissa bits


def test_conversion_swaps_modules_and_keeps_parameters():
    model = small_model()
    before = dict(model.named_parameters())
    convert_to_float8(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert isinstance(model.layers[0].self_attn.q_proj, Float8Linear)
    moe = model.layers[1].feed_forward
    assert isinstance(moe.experts, Float8Experts) and isinstance(moe.shared_expert.up_proj, Float8Linear)
    assert type(moe.router) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear
    assert not any(type(m) is Experts for m in model.modules())


def test_fp8_training_loss_tracks_fp32(tmp_path):
    losses = {}
    for fp8 in (False, True):
        model = small_model(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128)
        train(model, cfg(steps=40, fp8=fp8), token_data(batch=8, seq=32), causal_lm_loss, tmp_path / str(fp8))
        losses[fp8] = train_losses(tmp_path / str(fp8))
    assert losses[True][10] != losses[False][10]  # the float8 path really ran
    late = {k: statistics.mean(v[s] for s in range(31, 41)) for k, v in losses.items()}
    assert abs(late[True] - late[False]) / late[False] < FP8_LOSS_TOLERANCE, late
