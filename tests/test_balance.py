"""MoE load balancing: the selection bias steers choice but not gates; collapse happens without
balancing and not with it."""

import importlib.util
import json
from pathlib import Path

import torch

from herd.model.moe import MoE
from herd.train.balance import LoadBalancer
from herd.model.moe import RouterStats
from tests.test_train import small_model

ROOT = Path(__file__).resolve().parents[1]


def load_experiment():
    spec = importlib.util.spec_from_file_location("moe_balance", ROOT / "experiments" / "moe_balance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_bias_changes_the_choice_not_the_gate():
    model = small_model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(1, 12, 32)
    plain, stats = moe(x)
    logits = stats.logits
    moe.selection_bias = torch.tensor([0.0, 0.0, 0.0, 100.0])  # force every token to expert 3
    biased, biased_stats = moe(x)
    assert biased_stats.counts.tolist() == [0, 0, 0, 12]
    torch.testing.assert_close(biased_stats.logits, logits)  # stats report the raw logits
    # the gate is sigmoid of the *raw* logit of expert 3, applied to the expert's input
    flat = x.reshape(-1, 32)
    gate = torch.sigmoid(logits[:, 3:4])
    gu = (flat * gate) @ moe.experts.gate_up_proj[3]
    g, u = gu.chunk(2, -1)
    expected = moe.shared_expert(flat) + (torch.nn.functional.silu(g) * u) @ moe.experts.down_proj[3]
    torch.testing.assert_close(biased.reshape(-1, 32), expected)
    moe.selection_bias = None
    torch.testing.assert_close(moe(x)[0], plain)


def test_bias_update_follows_the_sign_rule_and_survives_a_checkpoint():
    model = small_model()
    balancer = LoadBalancer(model, "bias", rate=0.1)
    balancer.observe([RouterStats(logits=torch.zeros(12, 4), top_experts=torch.tensor([[0]] * 9 + [[2], [3], [3]]))])
    load = balancer.step()
    torch.testing.assert_close(load[0], torch.tensor([0.75, 0.0, 1 / 12, 2 / 12]))
    bias = balancer.layers[0].selection_bias
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))  # mean 3: only expert 0 is over
    state = balancer.state_dict()
    other = LoadBalancer(small_model(), "bias", rate=0.1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.layers[0].selection_bias, bias)


def test_aux_loss_pushes_router_away_from_the_busy_expert():
    logits = torch.zeros(8, 4, requires_grad=True)
    balancer = LoadBalancer(small_model(), "aux", aux_weight=1.0)
    loss = balancer.aux_loss([RouterStats(logits=logits, top_experts=torch.zeros(8, 1, dtype=torch.long))])
    loss.backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers expert 0


def run_share(tmp_path, balance: str, steps: int) -> float:
    exp = load_experiment()
    exp.run(balance, steps, tmp_path / balance, bias_rate=0.05)
    records = [json.loads(l) for l in (tmp_path / balance / "metrics.jsonl").read_text().splitlines()]
    load = torch.tensor([r["expert_load"] for r in records if r["kind"] == "train"][-5:])
    return load.amax(-1).mean().item()  # busiest expert's share, last 5 steps


def test_collapse_without_balancing_and_not_with_the_bias(tmp_path):
    collapsed = run_share(tmp_path, "none", steps=30)
    balanced = run_share(tmp_path, "bias", steps=30)
    assert collapsed > 0.6, (collapsed, balanced)  # 8 experts: perfect balance is 0.125
    assert balanced < 0.35, (collapsed, balanced)


def test_a_dense_model_trains_and_checkpoints_with_the_default_balancing(tmp_path):
    """No MoE layer, nothing to balance: the loop's checkpoint must not trip over the empty bias."""
    from herd.train.config import TrainConfig
    from herd.train.loop import train
    from herd.train.losses import causal_lm_loss
    from tests.test_train import token_data

    model = small_model(moe_layers=[])
    assert LoadBalancer(model, "bias").state_dict() == {}
    cfg = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=10**6, ckpt_every=1, progress=False)
    assert train(model, cfg, token_data(), causal_lm_loss, tmp_path).step == 2
