"""What weight-only quantization costs in quality: held-out perplexity of a briefly trained model,
full precision against int8, int4 and fp8.

    python benchmarks/quant_quality.py [--steps 300] [--seq 256]

The model is the tiny preset (text only, its vocabulary cut to the 256 byte values) trained for a few
hundred AdamW steps on Python standard library source as raw UTF-8 bytes, so that it has learned
something real without a tokenizer; perplexity is per byte on the held-out stdlib split
(`herd.data.corpora.stdlib_texts("validation")`). A deliberately small training run: the numbers
compare formats with each other, not with any released model.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from herd import get_preset
from herd.data.corpora import stdlib_texts
from herd.model import Llama4
from herd.quant import quantize_


def byte_stream(split: str, max_bytes: int) -> torch.Tensor:
    data = b"".join(d.text.encode() for d in stdlib_texts(split, max_bytes=max_bytes))
    return torch.frombuffer(bytearray(data[:max_bytes]), dtype=torch.uint8).long()


@torch.no_grad()
def perplexity(model: Llama4, data: torch.Tensor, seq: int, batch: int = 16) -> float:
    windows = data[: len(data) // (seq + 1) * (seq + 1)].view(-1, seq + 1)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=100_000, help="bytes of held-out text")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.vision = None
    config.text.vocab_size = 256  # bytes
    model = Llama4(config)
    train, held_out = byte_stream("train", 4_000_000), byte_stream("validation", args.held_out)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=g)
        w = torch.stack([train[s:s + args.seq + 1] for s in starts.tolist()])
        for group in opt.param_groups:  # linear warmup, cosine decay
            group["lr"] = args.lr * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss = F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train loss {loss.item():.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    model.eval()

    base = perplexity(model, held_out, args.seq)
    print(f"\nheld-out: {len(held_out)} bytes of stdlib source (validation split), per-byte perplexity")
    print("| weights | perplexity | change |")
    print("|---|---:|---:|")
    print(f"| fp32 | {base:.3f} | |")
    for method in ("int8", "fp8", "int4"):
        q = quantize_(copy.deepcopy(model), method)
        ppl = perplexity(q, held_out, args.seq)
        print(f"| {method} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
