"""A preallocated KV cache that knows iRoPE: bounded rings for chunked layers, full buffers for global ones.

A RoPE layer's query at position p sees only keys of its own chunk (positions p // C * C .. p,
C = attention_chunk_size), so such a layer never needs more than the last C - 1 past tokens: its
cache is a ring of C slots (the past C - 1 plus the token being decoded). A NoPE layer attends to
the whole context, so it keeps every token. At long context the rings stay a fixed size and only
the global layers grow (SPEC 2.1); the reference keeps full caches everywhere.

Slots are chosen by token *index* (the column in the batch), not by position: left padding aligns
every row's last token at the same index, so one decoding step writes one slot for the whole batch,
and the last C indices of a row always hold its last C positions. Padding is stored as document -1
and empty slots as document -2, so `attention_mask` (which compares positions and documents) hides
them without any bookkeeping here.

The cache implements the `KVCache` protocol of `herd.model.attention`. Layer 0's update opens a
forward call: it computes where this call's tokens go, once for all layers.
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..model.attention import TokenLayout

EMPTY = -2  # document id of a slot nothing was written to: matches no query


class _Slots:
    """Keys and values of one layer: [B, capacity, K, Dh] each, as views of head-major storage
    [B, K, capacity, Dh]. Attention reads them head by head (keys as a [capacity, Dh] matrix per row
    and KV head), which this layout serves without copying the cache every step."""

    def __init__(self, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device).transpose(1, 2)
        self.v = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device).transpose(1, 2)


class StaticKVCache:
    """Keys and values of every layer for `batch` sequences of up to `max_tokens` tokens
    (prompt, padding included, plus generated tokens).

    RoPE layers hold min(C, max_tokens) slots, NoPE layers max_tokens. All memory is allocated
    here, once; updates write in place.
    """

    def __init__(self, config: TextConfig, batch: int, max_tokens: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.batch, self.max_tokens = batch, max_tokens
        self.ring_size = min(config.attention_chunk_size, max_tokens)
        self.length = 0  # token indices written so far; equal for all rows
        K, Dh = config.num_key_value_heads, config.head_dim
        self.is_ring = [config.uses_rope(i) for i in range(config.num_hidden_layers)]
        self.slots = [_Slots(batch, self.ring_size if ring else max_tokens, K, Dh, dtype, device)
                      for ring in self.is_ring]
        # Where the stored tokens sit, shared by all layers of a kind (they see the same layouts).
        def layout(n: int):
            return (torch.zeros(batch, n, dtype=torch.long, device=device),
                    torch.full((batch, n), EMPTY, dtype=torch.long, device=device))
        self.ring_pos, self.ring_doc = layout(self.ring_size)
        self.full_pos, self.full_doc = layout(max_tokens)
        self._call: tuple | None = None  # (start, T, ring layout for this call, full layout)

    # ---------------------------------------------------------------- bookkeeping
    def nbytes(self) -> int:
        """Bytes held by keys and values (the position/document tables are ignored)."""
        return sum(2 * s.k.numel() * s.k.element_size() for s in self.slots)

    def unbounded_nbytes(self) -> int:
        """Bytes a cache without the chunk bound (every layer keeps every token) would hold."""
        s = self.slots[0].k
        return len(self.slots) * 2 * self.batch * self.max_tokens * s.shape[2] * s.shape[3] * s.element_size()

    def _begin(self, layout: TokenLayout, T: int):
        """Records this call's tokens in the position/document tables of both kinds."""
        start, end = self.length, self.length + T
        if end > self.max_tokens:
            raise ValueError(f"the cache holds {self.max_tokens} tokens per row and already has {start}; "
                             f"{T} more do not fit (build it with a larger max_tokens)")
        pos = layout.positions.expand(self.batch, T)
        doc = (layout.documents if layout.documents is not None else torch.zeros_like(pos)).expand(self.batch, T)
        self.full_pos[:, start:end], self.full_doc[:, start:end] = pos, doc
        full = TokenLayout(self.full_pos[:, :end], self.full_doc[:, :end])

        if T == 1:  # decoding: write first, then the ring holds everything the query may see
            slot = start % self.ring_size
            self.ring_pos[:, slot], self.ring_doc[:, slot] = pos[:, 0], doc[:, 0]
            ring = TokenLayout(self.ring_pos, self.ring_doc)
            ring_write = slot
        else:  # a prompt piece: its queries see what was cached before plus the piece itself
            if start == 0:
                ring = TokenLayout(pos, doc)
            else:
                ring = TokenLayout(torch.cat([self.ring_pos, pos], 1), torch.cat([self.ring_doc, doc], 1))
            # Only the piece's last ring_size tokens stay; their slots are distinct.
            keep = min(T, self.ring_size)
            ring_write = torch.arange(end - keep, end, device=pos.device) % self.ring_size
            self.ring_pos[:, ring_write], self.ring_doc[:, ring_write] = pos[:, T - keep:], doc[:, T - keep:]
        self._call = (start, T, ring, full, ring_write)
        self.length = end

    # ---------------------------------------------------------------- the KVCache protocol
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout
               ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Stores k, v [B, T, K, Dh] of `layer` and returns the keys, values and layout its
        queries attend to."""
        T = k.shape[1]
        if layer == 0:
            self._begin(layout, T)
        start, T_call, ring, full, ring_write = self._call
        assert T == T_call, "every layer of one forward call must see the same tokens"
        s = self.slots[layer]
        if not self.is_ring[layer]:
            s.k[:, start:start + T], s.v[:, start:start + T] = k, v
            return s.k[:, :start + T], s.v[:, :start + T], full
        if T == 1:
            s.k[:, ring_write], s.v[:, ring_write] = k[:, 0], v[:, 0]
            return s.k, s.v, ring
        keys, values = (k, v) if start == 0 else (torch.cat([s.k, k], 1), torch.cat([s.v, v], 1))
        keep = ring_write.numel()
        s.k[:, ring_write], s.v[:, ring_write] = k[:, T - keep:], v[:, T - keep:]
        return keys, values, ring
