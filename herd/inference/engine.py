"""Generation for a fixed batch of prompts: `generate` returns prompt + new tokens;
`generate_stream` yields each step's tokens as they come. Both run on the continuous-batching
engine (herd.inference.batching), one request per row.

A batch of prompts of different lengths comes left-padded (`pad_prompts`) with an attention mask;
each row's padding is dropped and the row becomes a request of its own, so padding changes nothing
a row computes. Prompts are prefilled in pieces of `prefill_chunk` tokens, which keeps peak memory
linear in the prompt: each piece's attention mask is [piece, cached + piece], never [prompt, prompt],
and only the last token of the last piece is projected to the vocabulary. Images are encoded once
per row, when the row is admitted, and their features fed to the pieces with the text embeddings.

The speed comes from outside: `prepare_for_decoding` (herd.inference.fast) swaps in decode modules,
and `compile=True` (herd.inference.compiled) runs the decode step as one compiled graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..model.llama4 import Llama4
from .batching import Engine, Request, SamplingParams
from .sampling import check_sampling

DEFAULT_PREFILL_CHUNK = 1024


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token lists into input_ids [B, T] and an attention_mask [B, T] (1 = real)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


def _stop_ids(model: Llama4, stop_token_ids: Sequence[int] | int | None) -> list[int]:
    if stop_token_ids is None:
        eos = model.config.text.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)


def _check_inputs(model: Llama4, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None, pixel_values: torch.Tensor | None, prefill_chunk: int):
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [batch, tokens]; use herd.inference.pad_prompts "
                         "for a batch of prompts of different lengths")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {list(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    lengths = torch.full((B,), T)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, but input_ids "
                             f"{list(input_ids.shape)}; they must match")
        mask = attention_mask.bool()
        # Left padding only: once a row's real tokens start, they run to the end.
        if (mask[:, :-1] & ~mask[:, 1:]).any() or not mask[:, -1].all():
            raise ValueError("attention_mask must describe left padding (0s, then 1s to the end of each row); "
                             "build the batch with herd.inference.pad_prompts")
        lengths = mask.sum(1).cpu()
    limit = model.config.text.max_position_embeddings
    longest = int(lengths.max())
    if longest > limit:
        raise ValueError(f"the prompt has {longest} tokens, more than the model's context "
                         f"(config.text.max_position_embeddings = {limit}); shorten the prompt")
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context (config.text.max_position_embeddings = {limit}); lower max_new_tokens "
                         f"to at most {limit - longest}")
    if pixel_values is not None and model.vision is None:
        raise ValueError("pixel_values given, but this model has no vision tower (a text-only checkpoint); "
                         "drop the image or load a multimodal (Llama4ForConditionalGeneration) checkpoint")


def generate_stream(model: Llama4, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.6,
                    top_p: float = 0.9, top_k: int | None = None,
                    stop_token_ids: Sequence[int] | int | None = None, pixel_values: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, seed: int | None = None,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, [B], once per step, for up to `max_new_tokens` steps.

    temperature 0 is greedy; otherwise tokens are sampled after top-k and top-p filtering (defaults:
    Llama 4 instruct's 0.6 and 0.9). A row that produced a stop token (default: the config's eos) yields
    the pad id from then on; the stream ends when every row has stopped. `seed` makes sampling
    reproducible: row i samples with its own generator, seeded `seed + i`, so its tokens do not
    depend on the other rows. `compile=True` runs the decode steps as one compiled graph (herd.inference.compiled:
    a prepared model, full precision or quantized; the first call compiles). Inputs are checked here, before the
    first token is asked for.
    """
    check_sampling(temperature, top_p, top_k)
    _check_inputs(model, input_ids, max_new_tokens, attention_mask, pixel_values, prefill_chunk)
    stops = tuple(_stop_ids(model, stop_token_ids))
    prompts = [row.tolist() for row in input_ids.cpu()] if attention_mask is None else \
        [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
    B = len(prompts)
    # Every row prefills a piece in the same step; rows then decode together.
    engine = Engine(model, max_batch=B, token_budget=B * (prefill_chunk + 1), compile=compile,
                    prefill_chunk=prefill_chunk)
    for i, (prompt, tiles) in enumerate(zip(prompts, _tiles_per_row(model, prompts, pixel_values))):
        sampling = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=None if seed is None else seed + i, stop_token_ids=stops)
        engine.add(Request(str(i), prompt, sampling, tiles))
    return _stream(engine, B, max_new_tokens, model.config.text.pad_token_id or 0, model.device)


def _tiles_per_row(model: Llama4, prompts: list[list[int]], pixel_values: torch.Tensor | None) -> list:
    """Splits the batch's image tiles (in order, for the <|patch|> tokens of every row) by row."""
    if pixel_values is None:
        return [None] * len(prompts)
    if len(prompts) == 1:
        return [pixel_values]
    per_tile = model.config.vision.tokens_per_tile
    patches = [p.count(model.config.image_token_index) for p in prompts]
    if any(n % per_tile for n in patches) or sum(patches) != pixel_values.shape[0] * per_tile:
        raise ValueError(f"image tokens and image features do not match: the rows hold {patches} <|patch|> tokens "
                         f"but pixel_values give {pixel_values.shape[0]} tiles x {per_tile} per tile; build the "
                         "prompts and the tiles with the same image processor")
    tiles = pixel_values.split([n // per_tile for n in patches])
    return [t if n else None for t, n in zip(tiles, patches)]


def _stream(engine: Engine, B: int, max_new_tokens: int, pad: int, device) -> Iterator[torch.Tensor]:
    """Steps the engine and yields [B] tokens once every row has its next one (rows reach their
    first token at different steps when their prompts take several pieces)."""
    tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        while not all(done[i] or len(tokens[i]) > t for i in range(B)):
            for out in engine.step():
                i = int(out.request_id)
                tokens[i] += out.token_ids
                done[i] = out.finished
        if all(len(row) <= t for row in tokens):  # every row stopped before step t
            return
        yield torch.tensor([row[t] if len(row) > t else pad for row in tokens], device=device)


def generate(model: Llama4, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens, LongTensor [B, T + new], where new <= max_new_tokens (fewer when every
    row stopped early; rows that stopped before the others are filled with the pad id). Takes the
    options of `generate_stream`."""
    new = list(generate_stream(model, input_ids, max_new_tokens, **kwargs))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, 1)], 1)
