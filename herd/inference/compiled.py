"""A compiled decoding step: `compiled_step(model, cache, tokens, positions)` runs one token per row
through a prepared model (herd.inference.fast) as one `torch.compile`d graph with static shapes;
`generate(..., compile=True)` uses it.

Eager decoding on CPU spends most of a step launching small ops (norms, RoPE, masks, MoE
bookkeeping); inductor fuses them into a few C++ loops, writes the full-precision matrix-vector
products itself (herd.inference.fast.blocked_matmul) and calls the quantized kernels from a C++
wrapper. Full-precision and quantized models both compile. To give it one graph that never recompiles,
the step differs from the eager one in two ways, neither of which changes what a query sees:
- the write position is a tensor (`index_copy_` into the cache), not a Python int, so the step is
  the same graph at every position;
- global layers attend to their whole preallocated buffer, unwritten slots being hidden by the
  cache's EMPTY document (eager decoding slices the written part instead).
The MoE needs no data-dependent split either: up to FEW_TOKENS (token, expert) pairs (batch 1) it
reads the chosen expert ids as graph-internal scalars (`capture_scalar_outputs`) and runs those
experts from their stacked weights; for more pairs, full-precision experts are gathered by index
inside fused reductions, and quantized ones keep the per-pair loop (herd.inference.fast.DecodeMoE).
Prefill stays eager (its pieces vary in length).

Compiling takes 10-30 s on CPU (inductor needs a C++ compiler there) and happens again for each new
batch size or cache size (the engine rounds cache sizes up to a power of two to make that rare),
so it is opt-in.
"""

from __future__ import annotations

import types
import weakref

import torch

from ..model.attention import TokenLayout
from .cache import StaticKVCache


class _StepView:
    """The KVCache protocol for one compiled step: writes this token's keys and values at a tensor
    index and returns every slot of the layer, with the layouts the step built."""

    def __init__(self, cache: StaticKVCache, index: torch.Tensor, ring_index: torch.Tensor,
                 ring: TokenLayout, full: TokenLayout):
        self.cache, self.index, self.ring_index, self.ring, self.full = cache, index, ring_index, ring, full

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout):
        s, is_ring = self.cache.slots[layer], self.cache.is_ring[layer]
        at = self.ring_index if is_ring else self.index
        s.k.index_copy_(1, at, k)
        s.v.index_copy_(1, at, v)
        return s.k, s.v, self.ring if is_ring else self.full


def _step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
          index: torch.Tensor) -> torch.Tensor:
    ring_index = index % cache.ring_size
    # Record the new token (document 0, like every real prompt token) in both position tables.
    cache.full_pos.index_copy_(1, index, positions)
    cache.full_doc.index_fill_(1, index, 0)
    cache.ring_pos.index_copy_(1, ring_index, positions)
    cache.ring_doc.index_fill_(1, ring_index, 0)
    layout = TokenLayout(positions)
    # One key layout per kind for every layer, so each kind's mask is built once (dense_mask's memo).
    ring, full = TokenLayout(cache.ring_pos, cache.ring_doc), TokenLayout(cache.full_pos, cache.full_doc)
    view = _StepView(cache, index, ring_index, ring, full)
    out = model(input_ids=tokens[:, None], layout=layout, cache=view, logits_to_keep=1)
    return out.logits[:, -1].float()


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled step


def _compiled(model):
    """The model's own compiled step, made on first use. Its guards skip the model's modules,
    whose checks cost ~10% of a step: a prepared model does not change. Dynamo keeps compiled
    graphs per code object, so each model gets its own copy of `_step`'s code; with a shared one,
    a second model would pass the pruned guards and run the first model's graph. Kept in a table
    keyed by the model, not on it, so that a deep copy of the model compiles its own step. (The
    step's tensors are still guarded: a new batch or cache size compiles again.)"""
    step = _STEPS.get(model)
    if step is None:
        own_code = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
        step = _STEPS[model] = torch.compile(
            own_code, dynamic=False, fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})
    return step


def check_compilable(model) -> None:
    """ValueError unless `model` can take the compiled step."""
    if not getattr(model, "decode_ready", False):
        raise ValueError("compile=True needs a model prepared with herd.inference.prepare_for_decoding")


def compiled_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens [B], positions [B, 1] -> logits [B, V] (fp32), writing the next slot of `cache`. The
    graph is compiled on the first call for each (model, batch, cache size) and reused after."""
    if cache.length >= cache.max_tokens:
        raise ValueError(f"the cache holds {cache.max_tokens} tokens per row and is full")
    index = torch.tensor([cache.length], device=tokens.device)
    cache.length += 1
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        return _compiled(model)(model, cache, tokens, positions, index)
