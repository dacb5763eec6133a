"""Weight-only quantization by module swap: `quantize_(model, "int8" | "int4" | "fp8")`.

Every nn.Linear of the text decoder (attention, shared expert, dense layers) and the lm_head is
replaced by a quantized stand-in with the same call signature, and every `Experts` block by
`QuantExperts`, which holds one quantized matrix per expert. The router stays in full precision
(it is tiny, and a flipped top-1 choice costs more than its bytes save), and so do the embeddings
and the vision tower (run once per image).

Which kernels run (see docs/inference.md for timings):
- int8 and int4 on CPUs with AVX-512 VNNI: herd's own (lowbit_cpu.cpp, built on first use by
  cpu_kernels.py), int8 activations times the stored integers;
- int8 on other CPUs: `torch._weight_int8pack_mm`, per-row scales, bf16 activations;
- int4 on other CPUs: `torch._weight_int4pack_mm_for_cpu`, group-wise scales and offsets, bf16
  activations;
- int4 on CUDA (compute capability 8.0+): PyTorch's tinygemm, `torch._weight_int4pack_mm`;
- int8 on CUDA: `torch._weight_int8pack_mm` where the build has its CUDA kernel;
- fp8: `torch._scaled_mm` on FP8-capable GPUs; dequantize-then-matmul elsewhere.
Other devices and unsupported shapes dequantize per call: right results, memory saved, no speed-up.

`herd.from_pretrained(path, quantize=...)` does not call `quantize_` on a loaded model: it swaps the
layers on the meta device (shapes only) and quantizes each weight as it is read (`load_quantized`),
so the full-precision model never exists; the result is the same bytes as `quantize_`.

A quantized model saves to a checkpoint directory with `quantization_config` in its config.json
(`herd.hf`); herd loads it back without the full-precision weights ever existing. Those files are
herd's own format: `transformers` does not read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, per_expert
from .fp8 import Fp8Weight
from .int4 import Int4Weight
from .int8 import Int8Weight

METHODS = ("int8", "int4", "fp8")
DEFAULT_GROUP_SIZE = 32
QUANTIZED_LAYERS = (Int8Weight, Int4Weight, Fp8Weight)
# Weights quantized at once while loading: a block's fp32 temporaries stay near 4 MiB each, however
# large the tensor (an expert stack of Scout holds 1.3 billion weights). Larger blocks load no faster
# and leave more freed memory in the allocator (docs/deployment.md).
BLOCK_WEIGHTS = 2**20


class QuantExperts(nn.Module):
    """`Experts` as two stacked quantized weights, [E, 2I, D] and [E, D, I] ([out, in] per expert);
    same call as `Experts.forward`. Stacked, an expert is picked by index, so a compiled decoding
    step can pick it by a traced expert id."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up  # [E, 2I, D]
        self.down_proj = down  # [E, D, I]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x [..., D]."""
        gate, up = self.gate_up_proj(x, e).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, e)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert, counts [E] -> [N, D]."""
        return per_expert(self.one, x, counts)


def _quantizer(method: str, group_size: int):
    if method == "int8":
        return Int8Weight.from_float
    if method == "int4":
        return lambda w: Int4Weight.from_float(w, group_size)
    if method == "fp8":
        return Fp8Weight.from_float
    raise ValueError(f"quantize: unknown method {method!r}; choose one of {', '.join(METHODS)} (or None)")


@torch.no_grad()
def quantize_(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Swaps the decoder's linear layers and experts for `method`'s quantized stand-ins, in place.
    `group_size` is the int4 group (columns per scale). Works on the meta device too (for loading
    quantized checkpoints)."""
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"quantize: group_size must be an even integer >= 2, got {group_size!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"quantize: the model is already quantized ({model.quantization['method']}); "
                         "load the full-precision checkpoint to quantize it another way")
    if getattr(model, "decode_ready", False):
        raise ValueError("quantize: the model was already prepared for decoding (prepare_for_decoding); "
                         "quantize first, then prepare")
    make = _quantizer(method, group_size)
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "router":
                setattr(parent, name, make(child.weight))  # herd's decoder linears have no bias
            elif isinstance(child, Experts):
                # HF layout is [E, in, out]: transpose to [E, out, in]
                setattr(parent, name, QuantExperts(make(child.gate_up_proj.transpose(1, 2)),
                                                   make(child.down_proj.transpose(1, 2))))
    model.lm_head = make(model.lm_head.weight)
    model.quantization = {"method": method, "group_size": group_size}
    return model


def quantize_in_blocks(make, weight: torch.Tensor, like: nn.Module, prepare=lambda block: block) -> nn.Module:
    """make(weight) for weight [(E,) N, K] (any view: memory-mapped, transposed), computed on blocks of
    output rows of about BLOCK_WEIGHTS weights, each passed through `prepare` first (device, dtype),
    and written into buffers shaped like those of `like` (the layer on the meta device). Every
    format scales each row on its own, so the blocks give exactly the bytes of the whole."""
    N = weight.shape[-2]
    rows = max(1, BLOCK_WEIGHTS // (weight.numel() // N))
    buffers = None
    for r in range(0, N, rows):
        part = make(prepare(weight[..., r:r + rows, :]))
        if buffers is None:
            buffers = [torch.empty_like(b, device=p.device) for b, p in zip(like.buffers(), part.buffers())]
        for whole, piece in zip(buffers, part.buffers()):
            row_dim = -2 if piece.ndim == weight.ndim else -1  # a row-wise format's scales: [(E,) N]
            whole.narrow(row_dim, r, piece.shape[row_dim]).copy_(piece)
    return type(like)(*buffers)


@torch.no_grad()
def load_quantized(model: nn.Module, name: str, weight: torch.Tensor, prepare=lambda block: block) -> nn.Module | None:
    """For herd.hf, loading into a model that `quantize_` swapped on the meta device: if the
    full-precision checkpoint tensor `name` (herd's name) is the weight of one of its quantized
    layers, quantizes it into a new layer put in that one's place and returns it; else None.
    `prepare` moves and casts each block of rows before it is quantized (quantize_in_blocks)."""
    path, _, leaf = name.rpartition(".")
    layer_name = path if leaf == "weight" else name  # nn.Linear's ".weight"; experts' stacks have no suffix
    try:
        layer = model.get_submodule(layer_name)
    except AttributeError:  # a parameter, not a module: never quantized
        return None
    if not isinstance(layer, QUANTIZED_LAYERS):
        return None
    parent_name, _, child = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, QuantExperts):
        weight = weight.transpose(1, 2)  # HF layout [E, in, out] -> [E, out, in], as quantize_ does
    method, group_size = model.quantization["method"], model.quantization["group_size"]
    quantized = quantize_in_blocks(_quantizer(method, group_size), weight, layer, prepare)
    setattr(parent, child, quantized)
    return quantized
