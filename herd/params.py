"""Parameter counts, computed on the meta device (no memory), and `herd params PRESET`.

"Active" follows the model card: the text tower as one token sees it (embedding, lm_head, every
attention and dense layer, the router, the shared expert and top-k of the routed experts); the
vision tower and projector are excluded. "Total" is every parameter, vision included.
"""

from __future__ import annotations

import json

import torch

from .config import ModelConfig
from .model import Llama4
from .presets import PRESETS, get_preset


def count_parameters(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Llama4(config)
    total = sum(p.numel() for p in model.parameters())
    text = total - sum(p.numel() for m in (model.vision, model.projector) if m is not None for p in m.parameters())
    k, E = config.text.num_experts_per_tok, config.text.num_local_experts
    idle_experts = sum(p.numel() * (E - k) // E for layer in model.layers if layer.is_moe
                       for p in layer.feed_forward.experts.parameters())
    return {"total": total, "active": text - idle_experts}


def _short(n: int) -> str:
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _run(args) -> int:
    counts = count_parameters(get_preset(args.preset))
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"{args.preset}: {counts['total']:,} parameters in total ({_short(counts['total'])}), "
              f"{counts['active']:,} active per token ({_short(counts['active'])})")
    return 0


def add_parser(sub):
    p = sub.add_parser("params", help="print a preset's total and active parameter counts")
    p.add_argument("preset", choices=list(PRESETS))
    p.add_argument("--json", action="store_true", help='print {"total": N, "active": N}')
    p.set_defaults(func=_run)
