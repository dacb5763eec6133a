"""Speed on this machine: prefill and decode tokens per second through herd's inference engine.

Prefill is timed from the call to the first token (the prompt fed through the cache in pieces, plus
one sampling step); decode from the first token to the last, greedy, with stop tokens off so every
run decodes the same number of tokens. A warm-up run first keeps one-time costs (allocator, kernel
selection, a compile) out of the figures; the best of `repeats` runs is reported, the usual way to
measure what the machine can do rather than what else it was doing.
"""

from __future__ import annotations

import time

import torch

from ..model import Llama4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(model: Llama4, prompt_tokens: int = 512, new_tokens: int = 64, batch: int = 1,
                  repeats: int = 2, seed: int = 0) -> dict:
    from ..inference import generate_stream

    limit = model.config.text.max_position_embeddings
    if prompt_tokens < 1 or new_tokens < 2 or prompt_tokens + new_tokens > limit:
        raise ValueError(f"speed needs prompt_tokens >= 1, new_tokens >= 2 and their sum within the model's "
                         f"context ({limit}); got {prompt_tokens} + {new_tokens}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.text.vocab_size, (batch, prompt_tokens), generator=g)
    device = model.device
    best_prefill = best_decode = float("inf")
    for run in range(repeats + 1):
        start = time.perf_counter()
        stream = generate_stream(model, ids, new_tokens, temperature=0.0, stop_token_ids=[])
        next(stream)
        _sync(device)
        first = time.perf_counter()
        steps = sum(1 for _ in stream)
        _sync(device)
        end = time.perf_counter()
        assert steps == new_tokens - 1
        if run > 0:  # run 0 is the warm-up
            best_prefill, best_decode = min(best_prefill, first - start), min(best_decode, end - first)
    return {"prefill_tokens_per_s": batch * prompt_tokens / best_prefill,
            "decode_tokens_per_s": batch * (new_tokens - 1) / best_decode,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": batch,
            "device": str(device), "threads": torch.get_num_threads(), "dtype": str(model.dtype)}
