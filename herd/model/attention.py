"""iRoPE attention: chunked RoPE layers and global NoPE layers (SPEC 2.1).

Who may see whom is decided by *positions and documents*, not by tensor indices: query q sees key
k iff both belong to the same document, pos[k] <= pos[q], and, on RoPE layers, both positions
fall in the same chunk (pos // chunk_size). Padding is a document of its own, positions count from
each sequence's first real token, so left-padded batches, packed documents, chunked prefill and
cached decoding all follow the one rule (`attention_mask`).

Fast path: a batch with no padding, no packing and no cache (training, most benchmarks) needs no
mask at all. Global layers use causal SDPA; chunked layers fold each chunk into the batch and run
causal SDPA per chunk, so their cost grows with T * chunk rather than T^2. `test_model` checks it
against the explicit mask.

Other batches (packed documents, padding, a cache) take SDPA with a dense boolean mask, built once
per layer kind and call. At long context that mask is T^2 bytes; `use_flex_attention(model)`
switches them to FlexAttention with a block-sparse mask from the same rule, which skips the
blocks nobody may see (compiled; meant for GPUs, where it also runs backward; the tests check its
forward on CPU).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .norm import rms_normalize
from .rope import apply_rope


@dataclass
class TokenLayout:
    """Where the tokens of one forward call sit. positions [B, T] count from each document's first
    real token; documents [B, T] tell documents (and padding, -1) apart, None meaning one document
    per row. `plain` promises one unpadded document per row at positions 0..T-1: the mask-free
    fast path."""

    positions: torch.Tensor
    documents: torch.Tensor | None = None
    plain: bool = False
    masks: dict = field(default_factory=dict, repr=False)  # built masks, reused by every layer of a kind


class KVCache(Protocol):
    """What attention needs from a KV cache (herd.inference implements it): store this call's keys
    and values for `layer` and return every key/value the queries may need ([B, S, K, Dh]), with
    their layout (positions and documents, [B, S] each)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout
               ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]: ...


def attention_mask(q: TokenLayout, k: TokenLayout, chunk_size: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: True where query t may attend to key s."""
    q_pos, k_pos = q.positions[:, :, None], k.positions[:, None, :]
    mask = k_pos <= q_pos
    if q.documents is not None or k.documents is not None:
        q_doc = q.documents if q.documents is not None else torch.zeros_like(q.positions)
        k_doc = k.documents if k.documents is not None else torch.zeros_like(k.positions)
        mask = mask & (k_doc[:, None, :] == q_doc[:, :, None])
    if chunk_size is not None:
        mask = mask & in_chunk_of(k_pos, q_pos, chunk_size)
    return mask[:, None]


def in_chunk_of(k_pos: torch.Tensor, q_pos: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """For keys no later than the query: same chunk means k >= the first position of q's chunk
    (one division per query rather than one per (query, key) pair)."""
    return k_pos >= q_pos - q_pos % chunk_size


def _visible(q: TokenLayout, k: TokenLayout, chunk_size: int | None):
    """The rule as a FlexAttention mask_mod over (batch, head, query index, key index)."""
    q_pos, k_pos = q.positions, k.positions
    q_doc = q.documents if q.documents is not None else torch.zeros_like(q_pos)
    k_doc = k.documents if k.documents is not None else torch.zeros_like(k_pos)

    def mask_mod(b, h, qi, ki):
        seen = (k_pos[b, ki] <= q_pos[b, qi]) & (k_doc[b, ki] == q_doc[b, qi])
        if chunk_size is not None:
            seen = seen & in_chunk_of(k_pos[b, ki], q_pos[b, qi], chunk_size)
        return seen

    return mask_mod


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# Inductor's CPU FlexAttention kernel computes a key block's scores with a micro-GEMM whose tail
# (a block of N % 16 keys) takes a "transpose first" branch when the tail is a whole number of
# vectors and head_dim < 24; that branch then reads and writes 16 columns instead of N. With
# AVX2's 8-float vectors a tail of 8 keys qualifies: scores past the block are garbage and the
# write overruns the score buffer into the softmax maxima (NaN rows). AVX-512's 16-float vectors
# never qualify. (torch 2.13; the tail kernel came with pytorch/pytorch#147068.) Keys padded to a
# multiple of 16, invisible to every query, leave no tail on any CPU.
CPU_KEY_MULTIPLE = 16
UNSEEN_DOCUMENT = -2  # the document of padded keys: no query has it (padding queries are -1)


def _pad_keys(k, v, layout: TokenLayout, multiple: int):
    """k, v [B, K, S, Dh] and their layout with S rounded up to `multiple` by unseen keys."""
    pad = -k.shape[2] % multiple
    if not pad:
        return k, v, layout
    documents = layout.documents if layout.documents is not None else torch.zeros_like(layout.positions)
    layout = TokenLayout(F.pad(layout.positions, (0, pad)), F.pad(documents, (0, pad), value=UNSEEN_DOCUMENT))
    return F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), layout


def flex_attend(q, k, v, q_layout: TokenLayout, k_layout: TokenLayout, chunk_size: int | None):
    """FlexAttention over [B, heads, T, Dh] inputs with the block mask of the visibility rule."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_layout = k_layout
    if q.device.type == "cpu":
        k, v, mask_layout = _pad_keys(k, v, k_layout, CPU_KEY_MULTIPLE)

    def build():
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        return create_block_mask(_visible(q_layout, mask_layout, chunk_size), B, None, T, S, device=q.device)

    block_mask = _memo(q_layout, k_layout, ("flex", chunk_size), build)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)


def _memo(q: TokenLayout, k: TokenLayout, key: tuple, build):
    """Every layer of a kind sees the same query layout and, without a cache, the same key layout
    (q itself); herd's cache also hands all layers of a kind one key layout per call. A mask is
    built once for each (query layout, key layout) pair; the entry holds a weak reference to k, so a
    layer given a different key layout rebuilds instead of reusing a stale mask. (A strong one would
    make q -> masks -> q a cycle, which FSDP's walk over forward arguments cannot cross.)"""
    entry = q.masks.get(key)
    if entry is None or entry[0]() is not k:
        entry = q.masks[key] = (weakref.ref(k), build())
    return entry[1]


def use_flex_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switches every decoder attention layer's masked path to FlexAttention (or back)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.flex = enabled
    return model


def temperature_scale(positions: torch.Tensor, attn_scale: float, floor_scale: int) -> torch.Tensor:
    """Query multiplier of NoPE layers: 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)),
    exactly 1 below floor_scale - 1, so it only changes long-context behaviour."""
    return 1.0 + attn_scale * torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale))


def chunked_causal_sdpa(q, k, v, chunk: int) -> torch.Tensor:
    """Causal attention within consecutive chunks of `chunk` tokens, for inputs [B, T, heads, Dh]
    whose positions are 0..T-1. Returns [B, T, H, Dh]."""
    B, T, H, Dh = q.shape
    n = -(-T // chunk)  # number of chunks
    if T % chunk:  # pad the last chunk; padded keys come after every real query, so stay unseen
        pad = (0, 0, 0, 0, 0, n * chunk - T)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)

    def fold(x):  # [B, n*C, heads, Dh] -> [B*n, heads, C, Dh]
        return x.reshape(B * n, chunk, x.shape[2], Dh).transpose(1, 2)

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, n * chunk, H, Dh)[:, :T]


def attend(q, k, v, layout: TokenLayout, cache: KVCache | None, layer: int, chunk_size: int | None,
           flex: bool = False) -> torch.Tensor:
    """Attention of q [B, T, H, Dh] over k, v [B, T, K, Dh] (plus what `cache` holds) under the
    visibility rule: the mask-free fast path when the layout allows it, else a mask. -> [B, T, H, Dh]"""
    T = q.shape[1]
    if cache is None and layout.plain:
        if chunk_size is None or T <= chunk_size:
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        return chunked_causal_sdpa(q, k, v, chunk_size)
    k_layout = layout
    if cache is not None:
        k, v, k_layout = cache.update(layer, k, v, layout)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, Dh]
    if flex:
        out = flex_attend(q, k, v, layout, k_layout, chunk_size)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(layout, k_layout, chunk_size),
                                             enable_gqa=True)
    return out.transpose(1, 2)


def dense_mask(q: TokenLayout, k: TokenLayout, chunk_size: int | None) -> torch.Tensor:
    """`attention_mask`, built once per call for every layer of a kind."""
    return _memo(q, k, ("dense", chunk_size), lambda: attention_mask(q, k, chunk_size))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.chunk_size = cfg.attention_chunk_size if self.use_rope else None
        self.qk_norm_eps = cfg.rms_norm_eps if (cfg.use_qk_norm and self.use_rope) else None
        self.temperature = (cfg.attn_scale, cfg.floor_scale) if (cfg.attn_temperature_tuning and not self.use_rope) else None
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=False)
        self.flex = False  # see use_flex_attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.qk_norm_eps is not None:  # after RoPE, per head, no weight (Scout; not Maverick)
                q, k = rms_normalize(q, self.qk_norm_eps), rms_normalize(k, self.qk_norm_eps)
        elif self.temperature is not None:
            q = (q * temperature_scale(layout.positions, *self.temperature)[..., None, None]).type_as(q)

        out = attend(q, k, v, layout, cache, self.layer, self.chunk_size, flex=self.flex)
        return self.o_proj(out.reshape(B, T, -1))
