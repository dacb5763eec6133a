"""MetaP: muP-style per-layer learning rates and init scales, so hyperparameters transfer (SPEC 6).

Meta published no formula. herd uses the muP rules for Adam (Yang et al., Tensor Programs V) plus
depth-muP's 1/sqrt(depth) residual-branch scaling, all measured against a *base shape* (the width
and depth at which the learning rate was tuned):

    m = width / base_width, d = depth / base_depth
    kind        examples                                init std        Adam lr
    input       embed_tokens, vision tower, projector   base             base
    hidden      q/k/v, gate/up, experts' gate_up         base / sqrt(m)   base / m
    residual    o_proj, down_proj, experts' down         base / sqrt(m*d) base / (m * sqrt(d))
    output      lm_head, router                          base / m         base / m
    vector      norms, biases                            base             base

muP also multiplies the logits by 1/m in the forward pass. Changing the forward would break logit
parity with the Hugging Face checkpoint, so that multiplier is folded into the output weights'
init and learning rate instead: for Adam, training W/m with lr/m is the same as multiplying W's
output by 1/m. At m = d = 1 every multiplier is 1 and MetaP is the plain parametrisation.
The vision tower keeps its own widths and is treated as input-side (multiplier 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model import Llama4

RESIDUAL_SUFFIXES = ("self_attn.o_proj.weight", "down_proj.weight", "experts.down_proj")
OUTPUT_PREFIXES = ("lm_head.",)
OUTPUT_SUFFIXES = ("router.weight",)


@dataclass(frozen=True)
class Multipliers:
    init: float
    lr: float


def parameter_kind(name: str, param: torch.Tensor) -> str:
    """input / hidden / residual / output / vector for a parameter name of `Llama4`."""
    if param.ndim < 2:
        return "vector"
    if name.startswith(("embed_tokens.", "vision.", "projector.")):
        return "input"
    if name.startswith(OUTPUT_PREFIXES) or name.endswith(OUTPUT_SUFFIXES):
        return "output"
    if name.endswith(RESIDUAL_SUFFIXES):
        return "residual"
    return "hidden"


def multipliers(kind: str, width_mult: float, depth_mult: float) -> Multipliers:
    m, d = width_mult, depth_mult
    return {
        "input": Multipliers(1.0, 1.0),
        "vector": Multipliers(1.0, 1.0),
        "hidden": Multipliers(1 / math.sqrt(m), 1 / m),
        "residual": Multipliers(1 / math.sqrt(m * d), 1 / (m * math.sqrt(d))),
        "output": Multipliers(1 / m, 1 / m),
    }[kind]


def shape_multipliers(model: Llama4, base_width: int, base_depth: int) -> tuple[float, float]:
    t = model.config.text
    return t.hidden_size / base_width, t.num_hidden_layers / base_depth


def lr_multipliers(model: nn.Module, base_width: int, base_depth: int) -> dict[str, float]:
    """Parameter name -> multiplier on the base learning rate."""
    m, d = shape_multipliers(model, base_width, base_depth)
    return {n: multipliers(parameter_kind(n, p), m, d).lr for n, p in model.named_parameters()}


@torch.no_grad()
def metap_init_(model: Llama4, base_width: int, base_depth: int) -> None:
    """Rescales a freshly initialised model's matrices by their MetaP init multipliers."""
    m, d = shape_multipliers(model, base_width, base_depth)
    for name, p in model.named_parameters():
        scale = multipliers(parameter_kind(name, p), m, d).init
        if scale != 1.0:
            p.mul_(scale)
