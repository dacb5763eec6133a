"""Forward + backward throughput of one MoE config in herd and in `transformers`, in one run.

    python benchmarks/moe_forward_backward.py [--steps 3] [--threads N]

Both models hold the same weights (herd's checkpoint loaded by `transformers`). `transformers` runs
every expert on every token (8 experts, top-1: about 3x the useful work at this size); herd runs
only the routed ones. Prints tokens/s for both, their ratio, and herd's model-FLOPs utilisation
against the matmul peak measured on this machine in the same run. Not a test: timings on shared
machines are noisy, which is why only the ratio is meant to be compared.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import benchmark_config, hf_twin, throughput_args

from herd.config import TextConfig
from herd.model import Llama4
from herd.train.metrics import measure_matmul_peak

BATCH, SEQ = 8, 512


def matmul_peak_flops() -> float:
    """Best fp32 matmul rate of this machine, FLOP/s (the trainer's own measurement)."""
    return measure_matmul_peak(size=2048, repeats=10)


def useful_train_flops_per_token(cfg: TextConfig, seq: int) -> float:
    """6 x (matmul weights one token uses) + causal attention actually needed, forward + backward."""
    D, Dh, H, K = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn_proj = D * Dh * (2 * H + 2 * K)
    ffn = 3 * D * cfg.intermediate_size * (1 + cfg.num_experts_per_tok) + D * cfg.num_local_experts
    weights = cfg.num_hidden_layers * (attn_proj + ffn) + D * cfg.vocab_size
    attn = 0.0
    for layer in range(cfg.num_hidden_layers):
        span = min(seq, cfg.attention_chunk_size) if cfg.uses_rope(layer) else seq
        attn += 2 * 2 * H * Dh * (span + 1) / 2  # q.k and p.v over the keys a query sees on average
    return 6 * weights + 3 * attn


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main():
    args = throughput_args(__doc__, steps=3)
    torch.manual_seed(0)
    cfg = benchmark_config()
    herd_model = Llama4(cfg).train()
    hf_model = hf_twin(herd_model).train()

    ids = torch.randint(0, cfg.text.vocab_size, (BATCH, SEQ))
    targets = torch.roll(ids, -1, dims=1)

    def herd_step():
        loss = F.cross_entropy(herd_model(ids).logits.flatten(0, 1), targets.flatten())
        loss.backward()
        herd_model.zero_grad(set_to_none=True)

    def hf_step():
        loss = F.cross_entropy(hf_model(input_ids=ids).logits.flatten(0, 1), targets.flatten())
        loss.backward()
        hf_model.zero_grad(set_to_none=True)

    tokens = BATCH * SEQ
    peak = matmul_peak_flops()
    t_herd = time_steps(herd_step, args.steps)
    t_hf = time_steps(hf_step, args.steps)
    flops = useful_train_flops_per_token(cfg.text, SEQ) * tokens
    print(f"config: hidden 256, 8 layers, 8 heads / 2 KV, 8 experts top-1 (width 512), vocab 8192, chunk 256, "
          f"batch {BATCH}x{SEQ}, {torch.get_num_threads()} threads")
    print(f"herd          {tokens / t_herd:10.0f} tokens/s  ({t_herd:.2f} s/step)")
    print(f"transformers  {tokens / t_hf:10.0f} tokens/s  ({t_hf:.2f} s/step)")
    print(f"ratio         {t_hf / t_herd:10.2f}x")
    print(f"herd MFU      {flops / t_herd / peak:10.1%}  (useful {flops / t_herd / 1e9:.1f} GFLOP/s vs measured "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
