"""Training throughput: herd's training loop against `transformers` on the same weights, in one run.

    python benchmarks/train_throughput.py [--steps 4] [--threads N]

Config (shared with benchmarks/moe_forward_backward.py): hidden 256, 8 layers, 8 heads / 2 KV
heads of 32, 8 experts top-1 of width 512, vocab 8192, chunk 256; batch 8 x 512 tokens, CPU.
herd runs its real training loop (herd.train.train: loss, backward, clipping, AdamW, selection-bias
update, logging); `transformers` (Llama4ForCausalLM, loaded from herd's checkpoint) runs the same
step by hand: cross-entropy, backward, clipping, AdamW. Prints tokens/s for both, their ratio, and
herd's MFU against the fp32 matmul peak measured in the same run. Not a test: the machine is shared
and timings are noisy, so compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_config, hf_twin, throughput_args  # noqa: E402
from moe_forward_backward import BATCH, SEQ, matmul_peak_flops, useful_train_flops_per_token  # noqa: E402

from herd.model import Llama4  # noqa: E402
from herd.train.config import TrainConfig  # noqa: E402
from herd.train.loop import train  # noqa: E402
from herd.train.losses import Batch, causal_lm_loss  # noqa: E402
from herd.train.metrics import read_metrics  # noqa: E402


class FixedBatches:
    """The same batch every step (throughput only)."""

    def __init__(self, batch: Batch):
        self.fixed = batch

    def __next__(self) -> Batch:
        return self.fixed

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def main():
    args = throughput_args(__doc__, steps=4)
    torch.manual_seed(0)
    cfg = benchmark_config()
    herd_model = Llama4(cfg)
    ids = torch.randint(0, cfg.text.vocab_size, (BATCH, SEQ + 1))
    batch = Batch(input_ids=ids[:, :-1], labels=ids[:, 1:])
    tokens = BATCH * SEQ
    hf_model = hf_twin(herd_model).train()
    with tempfile.TemporaryDirectory() as tmp:
        peak = matmul_peak_flops()

        # herd: the training loop itself; per-step throughput from its metrics, first step dropped
        tcfg = TrainConfig(steps=args.steps + 1, batch_size=BATCH, seq_len=SEQ, warmup_steps=1, log_every=1,
                           eval_every=10**6, ckpt_every=10**6, progress=False)
        train(herd_model, tcfg, FixedBatches(batch), causal_lm_loss, Path(tmp) / "run")
        rates = [r["tokens_per_s"] for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if r["step"] > 1]
        herd_tok_s = statistics.median(rates)

    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)

    def hf_step():
        logits = hf_model(input_ids=batch.input_ids).logits
        F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    hf_step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        hf_step()
        times.append(time.perf_counter() - t0)
    hf_tok_s = tokens / statistics.median(times)

    flops = useful_train_flops_per_token(cfg.text, SEQ)
    print(f"config: hidden 256, 8 layers, 8 heads / 2 KV, 8 experts top-1 (width 512), vocab 8192, chunk 256, "
          f"batch {BATCH}x{SEQ}, {torch.get_num_threads()} threads; full training step with AdamW")
    print(f"herd (training loop)  {herd_tok_s:10.0f} tokens/s")
    print(f"transformers          {hf_tok_s:10.0f} tokens/s")
    print(f"ratio                 {herd_tok_s / hf_tok_s:10.2f}x")
    print(f"herd MFU              {herd_tok_s * flops / peak:10.1%}  (measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
