"""Router collapse without load balancing, and none with it (SPEC 2.2).

    python experiments/moe_balance.py [--steps 150]

Collapse-prone setting: a small MoE language model that starts collapsed. Its token embeddings
share one direction and every router sends that direction to expert 0, so all tokens start on
expert 0 and only expert 0's gate and weights get gradients: the rich get richer. The same run is repeated with no balancing, the auxiliary loss, and the auxiliary-loss-free
selection bias; for each it prints the share of tokens the busiest expert got (1/E is perfect
balance, 1.0 total collapse) over the last 10 steps, and the final training loss. The numbers in
docs/training.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from herd.config import ModelConfig, TextConfig
from herd.data.documents import Document
from herd.data.packing import PackedLoader
from herd.model import Llama4
from herd.model.moe import MoE
from herd.train.config import TrainConfig
from herd.train.loop import train
from herd.train.losses import causal_lm_loss


def collapse_prone_model(seed: int = 0) -> Llama4:
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      attention_chunk_size=16, num_local_experts=8, interleave_moe_layer_step=1,
                      floor_scale=16, rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = Llama4(ModelConfig(text=text, vision=None))
    with torch.no_grad():
        # Every token embedding shares a direction u, and expert 0's router row points along it: all
        # tokens start on expert 0 (logit about 2, the others 0), and only expert 0 learns.
        u = torch.ones(text.hidden_size) / text.hidden_size**0.5
        model.embed_tokens.weight += 0.4 * u
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.zero_()
                m.router.weight[0] = 0.3 * u
    return model


def pattern_data(batch: int = 8, seq: int = 32) -> PackedLoader:
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(3, 128, (1,), generator=g) + torch.arange(64) * torch.randint(1, 9, (1,), generator=g))
            .remainder(125).add(3).tolist() for _ in range(64)]
    docs = [Document(np.array(d + [1]), np.ones(len(d) + 1, dtype=bool)) for d in docs]  # 1: end of text
    return PackedLoader(docs, seq_len=seq, batch_size=batch, pad_id=2)


def run(balance: str, steps: int, run_dir: Path, bias_rate: float = 0.02, aux_weight: float = 0.05) -> dict:
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=5, balance=balance, bias_rate=bias_rate,
                      aux_weight=aux_weight, log_every=1, eval_every=10**6, ckpt_every=10**6, progress=False)
    train(collapse_prone_model(), cfg, pattern_data(), causal_lm_loss, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    load = torch.tensor([r["expert_load"] for r in records[-10:]])  # [10, layers, E]
    return {"balance": balance, "max_share": load.amax(-1).mean().item(),
            "min_share": load.amin(-1).mean().item(), "loss": records[-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    print(f"8 experts top-1, routers start collapsed on expert 0, {args.steps} steps; share of tokens per expert over the last "
          "10 steps (perfect balance 0.125)")
    print("| balancing | busiest expert | idlest expert | final loss |")
    print("|---|---|---|---|")
    for balance in ("none", "aux", "bias"):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(balance, args.steps, Path(tmp))
        print(f"| {balance} | {r['max_share']:.3f} | {r['min_share']:.3f} | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()
