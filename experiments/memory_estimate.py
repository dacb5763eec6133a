"""Per-GPU memory of training Scout and Maverick with herd's FSDP2 + expert parallelism (estimate).

    python experiments/memory_estimate.py

Layout: one mesh dimension of N ranks; every weight FSDP-sharded over all N, routed experts split
N ways (so N must divide the expert count: Scout <= 16 ranks, Maverick <= 128). Parameter counts
come from the presets on the meta device. Per GPU:
- states: fp32 weights 4 + fp32 gradients 4 + AdamW m and v 8 = 16 bytes per parameter, / N;
- gather: FSDP materialises one decoder layer's non-expert weights at a time, two with prefetch;
- activations per sequence of S tokens (fp32, no activation checkpointing): about 70 x S x D bytes per
  layer (attention and norm inputs/outputs, Q/K/V, SwiGLU intermediates of the shared and routed
  expert at width 8192); with full activation checkpointing only each layer's input (4 x S x D) is
  kept plus one layer's working set. These are estimates to size a job, not measurements.
"""

from __future__ import annotations

import torch

from herd.model import Llama4
from herd.presets import get_preset

GIB = 2**30


def estimate(preset: str, ranks: int, seq: int) -> dict:
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Llama4(cfg)
    total = model.num_parameters()
    t = cfg.text
    layer = model.layers[0]
    dense_layer = sum(p.numel() for n, p in layer.named_parameters() if "experts." not in n or "shared" in n)
    states = 16 * total / ranks
    gather = 2 * 4 * dense_layer
    per_layer_act = 70 * seq * t.hidden_size
    return {"preset": preset, "params": total, "ranks": ranks, "states": states / GIB, "gather": gather / GIB,
            "act_full": t.num_hidden_layers * per_layer_act / GIB,
            "act_ckpt": (t.num_hidden_layers * 4 * seq * t.hidden_size + per_layer_act) / GIB}


def main():
    print("| model | GPUs (N) | params | states /GPU | FSDP gather | activations, seq 8192 (no ckpt / full ckpt) | total with ckpt |")
    print("|---|---|---|---|---|---|---|")
    for preset, ranks in (("scout", 16), ("maverick", 64), ("maverick", 128)):
        e = estimate(preset, ranks, 8192)
        total = e["states"] + e["gather"] + e["act_ckpt"]
        print(f"| {preset} | {ranks} | {e['params'] / 1e9:.1f}B | {e['states']:.1f} GiB | {e['gather']:.1f} GiB | "
              f"{e['act_full']:.0f} / {e['act_ckpt']:.1f} GiB | {total:.0f} GiB |")


if __name__ == "__main__":
    main()
