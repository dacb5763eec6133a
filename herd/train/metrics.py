"""Metrics: a JSONL log (TensorBoard too when installed), FLOPs per token, and the matmul peak.

MFU (model FLOPs utilisation) = achieved model FLOPs / peak FLOPs. Model FLOPs per trained token
are 6 x the *active* matmul parameters (forward 2, backward 4; one routed expert per token for
top-1) plus attention's score and value products, 12 x layers x heads x head_dim x keys attended.
The peak is measured, not looked up: a large fp32 matmul on this machine, so that MFU on a CPU
means something.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..model import Llama4


class MetricsLog:
    """Appends one JSON object per line to `path`; mirrors scalars to TensorBoard if available."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            stage = record.get("stage", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{stage}/{key}", value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics file; after a resume, a later record for a (stage, step, kind) wins."""
    path = Path(path)
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r.get("stage"), r.get("step"), r.get("kind"))] = r
    return list(records.values())


def training_flops_per_token(model: Llama4, seq_len: int) -> float:
    """6 x active matmul params + attention, for a sequence of `seq_len` text tokens."""
    t = model.config.text
    active = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith(("embed_tokens.", "vision.", "projector.")):
            continue  # an embedding lookup is not a matmul; the vision tower is counted apart
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            active += p[0].numel() * t.num_experts_per_tok  # only the routed experts run
        else:
            active += p.numel()
    attn = 0.0
    for layer in range(t.num_hidden_layers):
        window = min(seq_len, t.attention_chunk_size) if t.uses_rope(layer) else seq_len
        attn += 12 * t.num_attention_heads * t.head_dim * (window + 1) / 2  # causal: average keys
    return 6 * active + attn


def measure_matmul_peak(size: int = 1024, repeats: int = 20, dtype=torch.float32) -> float:
    """Best FLOP/s of a square matmul on this machine, the denominator of MFU. The best of many
    short tries, so that a moment of contention on a shared machine does not lower the peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    return nll_nats_sum / math.log(2) / max(n_bytes, 1)
