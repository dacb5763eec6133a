"""Generation: prefill the prompt in pieces into a preallocated cache, then decode one token a step.

`generate` returns prompt + new tokens; `generate_stream` yields each step's tokens as they come.
Batches of prompts of different lengths are left-padded (`pad_prompts`) with an attention mask:
positions count from each row's first real token, so padding changes nothing a row computes.

Prefilling in pieces of `prefill_chunk` tokens keeps peak memory linear in the prompt: each piece's
attention mask is [piece, cached + piece], never [prompt, prompt], and only the last token of the
last piece is projected to the vocabulary. Images are encoded once, for the whole prompt, and their
features are fed to the pieces with the text embeddings.

Each step is one `Llama4.forward` call on the new tokens' embeddings; the speed comes from outside:
`prepare_for_decoding` (herd.inference.fast) swaps in decode modules, and `compile=True`
(herd.inference.compiled) runs the step as one compiled graph. The cache writes in place, and the
engine's only host synchronisation per step is the check whether every row has stopped (the MoE
reads its chosen experts' ids once per layer, which costs nothing on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..model.attention import TokenLayout
from ..model.llama4 import Llama4, token_layout
from .cache import StaticKVCache
from .compiled import check_compilable, compiled_step
from .sampling import check_sampling, sample

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


class Decoder:
    """One forward call of `model` on embeddings against a cache: the prefill and decode steps share
    it. (Generation starts from embeddings so that image features computed once can be fed to the
    prompt's pieces.)"""

    def __init__(self, model: Llama4):
        self.model = model

    def __call__(self, h: torch.Tensor, layout: TokenLayout, cache: StaticKVCache) -> torch.Tensor:
        """h [B, T, D] -> logits of the last token [B, V] (fp32)."""
        return self.model(inputs_embeds=h, layout=layout, cache=cache, logits_to_keep=1).logits[:, -1].float()


def prefill(decoder: Decoder, input_ids: torch.Tensor, cache: StaticKVCache,
            attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
            prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Feeds the prompt into `cache` in pieces. Returns the last token's logits [B, V] and each
    row's last position [B, 1]."""
    model = decoder.model
    layout = token_layout(input_ids, attention_mask)
    embeds = model.embed(input_ids, pixel_values) if pixel_values is not None else None
    T = input_ids.shape[1]
    for a in range(0, T, prefill_chunk):
        b = min(a + prefill_chunk, T)
        docs = None if layout.documents is None else layout.documents[:, a:b]
        h = embeds[:, a:b] if embeds is not None else model.embed_tokens(input_ids[:, a:b])
        logits = decoder(h, TokenLayout(layout.positions[:, a:b], docs), cache)
    return logits, layout.positions[:, -1:]


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
    reproducible. `compile=True` runs the decode steps as one compiled graph (herd.inference.compiled:
    a prepared model, full precision or quantized; the first call compiles). Inputs are checked here, before the
    first token is asked for.
    """
    check_sampling(temperature, top_p, top_k)
    _check_inputs(model, input_ids, max_new_tokens, attention_mask, pixel_values, prefill_chunk)
    if compile:
        check_compilable(model)
    return _stream(model, input_ids, max_new_tokens, temperature, top_p, top_k, _stop_ids(model, stop_token_ids),
                   pixel_values, attention_mask, seed, prefill_chunk, compile)


@torch.inference_mode()
def _stream(model, input_ids, max_new_tokens, temperature, top_p, top_k, stops, pixel_values, attention_mask,
            seed, prefill_chunk, compile) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    B, T = input_ids.shape
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    pad = model.config.text.pad_token_id or 0
    stops_t = torch.tensor(stops, dtype=torch.long, device=device)

    decoder = Decoder(model)
    # The last sampled token is never fed back, hence the - 1. A compiled step is compiled per cache
    # size: round it up to a power of two (at least 256), so that a conversation that keeps growing
    # compiles a new graph only each time it doubles.
    size = T + max_new_tokens - 1
    if compile:
        size = max(256, 1 << (size - 1).bit_length())
    cache = StaticKVCache(model.config.text, B, size, dtype=model.dtype, device=device)
    logits, pos = prefill(decoder, input_ids, cache, attention_mask, pixel_values, prefill_chunk)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = sample(logits, temperature, top_p, top_k, generator)
        tokens = torch.where(finished, pad, tokens)
        yield tokens
        if len(stops):
            finished |= torch.isin(tokens, stops_t)
            if bool(finished.all()):  # the one host sync per step
                return
        if step == max_new_tokens - 1:
            return
        pos = pos + 1
        if compile:
            logits = compiled_step(model, cache, tokens, pos)
        else:
            logits = decoder(model.embed_tokens(tokens[:, None]), TokenLayout(pos), cache)


def generate(model: Llama4, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens, LongTensor [B, T + new], where new <= max_new_tokens (fewer when every
    row stopped early; rows that stopped before the others are filled with the pad id). Takes the
    options of `generate_stream`."""
    new = list(generate_stream(model, input_ids, max_new_tokens, **kwargs))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, 1)], 1)
