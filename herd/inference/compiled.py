"""A compiled decoding step: `compiled_step(model, cache, tokens, positions, documents)` runs one
token per row through a prepared model (herd.inference.fast) as one `torch.compile`d graph with
static shapes; the engine (herd.inference.batching) uses it with `compile=True`.

Eager decoding on CPU spends most of a step launching small ops (norms, RoPE, masks, MoE
bookkeeping); inductor fuses them into a few C++ loops, writes the full-precision matrix-vector
products itself (herd.inference.fast.blocked_matmul) and calls the quantized kernels from a C++
wrapper. Full-precision and quantized models both compile. To give it one graph that never recompiles,
the step differs from the eager one in two ways, neither of which changes what a query sees:
- the write positions are a tensor (one per row, scattered into the cache), not Python ints, so
  the step is the same graph at every position;
- global layers attend to their whole preallocated buffer, unwritten slots being hidden by the
  cache's EMPTY document (eager decoding slices the written part instead).
The MoE needs no data-dependent split either: up to FEW_TOKENS (token, expert) pairs (batch 1) it
reads the chosen expert ids as graph-internal scalars (`capture_scalar_outputs`) and runs those
experts from their stacked weights; for more pairs, full-precision experts are gathered by index
inside fused reductions, and quantized ones keep the per-pair loop (herd.inference.fast.DecodeMoE).
Prefill stays eager (its pieces vary in length).

Compiling takes 10-30 s on CPU (inductor needs a C++ compiler there) and happens again for each new
batch size or cache size (the engine rounds both up to a power of two to make that rare), so it
is opt-in.
"""

from __future__ import annotations

import types
import weakref

import torch

from .cache import StaticKVCache


def _step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
          documents: torch.Tensor) -> torch.Tensor:
    step = cache.step(positions, documents)  # every global slot: one graph at every length
    out = model(input_ids=tokens[:, None], layout=step.layout, cache=step, logits_to_keep=1)
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


def compiled_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                  documents: torch.Tensor) -> torch.Tensor:
    """One token in each of the cache's rows 0..n-1 (herd.inference.cache.StaticKVCache.step):
    tokens, positions and documents [n] -> logits [n, V] (fp32). The graph is compiled on the first
    call for each (model, n, cache capacity) and reused after."""
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        return _compiled(model)(model, cache, tokens, positions, documents)
