"""A preallocated KV cache that knows iRoPE: bounded rings for chunked layers, full buffers for global
ones, with one sequence per row and every row at its own length.

A RoPE layer's query at position p sees only keys of its own chunk (positions p // C * C .. p,
C = attention_chunk_size), so such a layer never needs more than the last C - 1 past tokens: its
cache is a ring of C slots (the past C - 1 plus the token being decoded). A NoPE layer attends to
the whole context, so it keeps every token. At long context the rings stay a fixed size and only
the global layers grow (SPEC 2.1); the reference keeps full caches everywhere.

Each row holds one sequence from position 0, so a token's slot is its position: position p of a
row lives at index p of the row's full buffers and at p % C of its rings, and the last C positions
of a row are always in its ring. Rows have their own lengths, so sequences join and leave a running
batch (herd.inference.batching). Empty slots are stored as document -2 (EMPTY), which matches no
real query, so `attention_mask` (which compares positions and documents) hides them without any
bookkeeping here: freeing a row is marking its slots EMPTY, and its stale keys stay where they are.

A forward call reaches the cache through a view that implements the `KVCache` protocol of
`herd.model.attention`: `cache.piece(row, n)` for n prompt tokens of one row (prefill), or
`cache.step(positions, documents)` for one token in each of the rows 0..n-1 (decoding). Making the
view records where the call's tokens go, once for all layers; each layer's `update` then writes its
keys and values there. Global buffers grow on demand (doubling, up to `max_tokens`), so a cache that
allows long sequences costs memory only once a row is long.
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..model.attention import TokenLayout

EMPTY = -2  # document id of a slot nothing (real) was written to: matches no real query


def _head_major(batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device) -> torch.Tensor:
    """[B, capacity, K, Dh] as a view of head-major storage [B, K, capacity, Dh]. Attention reads
    keys head by head (a [capacity, Dh] matrix per row and KV head), which this layout serves
    without copying the cache every step."""
    return torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device).transpose(1, 2)


class StaticKVCache:
    """Keys and values of every layer for `batch` rows of up to `max_tokens` tokens each.

    RoPE layers hold ring_size = min(C, max_tokens) slots per row, NoPE layers `capacity` slots,
    which starts at `capacity` (default: max_tokens) and grows with `reserve`. Updates write in place.
    """

    def __init__(self, config: TextConfig, batch: int, max_tokens: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", capacity: int | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.batch, self.max_tokens, self.dtype, self.device = batch, max_tokens, dtype, torch.device(device)
        self.ring_size = min(config.attention_chunk_size, max_tokens)
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.is_ring = [config.uses_rope(i) for i in range(config.num_hidden_layers)]
        self.capacity = 0
        self.k: list[torch.Tensor] = [_head_major(batch, self.ring_size, self.kv_heads, self.head_dim, dtype, device)
                                      if ring else None for ring in self.is_ring]
        self.v: list[torch.Tensor] = [k.clone() if k is not None else None for k in self.k]
        # Where the stored tokens sit, shared by all layers of a kind (they see the same layouts).
        self.ring_pos = torch.zeros(batch, self.ring_size, dtype=torch.long, device=device)
        self.ring_doc = torch.full((batch, self.ring_size), EMPTY, dtype=torch.long, device=device)
        self.full_pos = self.full_doc = None
        self.lengths = [0] * batch  # tokens written to each row (host side)
        self.reserve(max_tokens if capacity is None else capacity)

    # ---------------------------------------------------------------- bookkeeping
    def reserve(self, capacity: int):
        """Grows the global layers' buffers to hold `capacity` tokens per row (keeping their contents)."""
        capacity = min(capacity, self.max_tokens)
        if capacity <= self.capacity:
            return
        old = self.capacity
        for i, ring in enumerate(self.is_ring):
            if not ring:
                for kv in (self.k, self.v):
                    new = _head_major(self.batch, capacity, self.kv_heads, self.head_dim, self.dtype, self.device)
                    if old:
                        new[:, :old] = kv[i]
                    kv[i] = new
        pos = torch.zeros(self.batch, capacity, dtype=torch.long, device=self.device)
        doc = torch.full((self.batch, capacity), EMPTY, dtype=torch.long, device=self.device)
        if old:
            pos[:, :old], doc[:, :old] = self.full_pos, self.full_doc
        self.full_pos, self.full_doc, self.capacity = pos, doc, capacity

    def reset(self, row: int):
        """Empties a row for a new sequence: its slots become EMPTY, its length 0."""
        self.ring_doc[row] = EMPTY
        self.full_doc[row] = EMPTY
        self.lengths[row] = 0

    def nbytes(self) -> int:
        """Bytes held by keys and values (the position/document tables are ignored)."""
        return sum(2 * k.numel() * k.element_size() for k in self.k)

    def unbounded_nbytes(self) -> int:
        """Bytes a cache of max_tokens without the chunk bound (every layer keeps every token) would hold."""
        per_token = self.kv_heads * self.head_dim * self.k[0].element_size()
        return len(self.k) * 2 * self.batch * self.max_tokens * per_token

    # ---------------------------------------------------------------- views for one forward call
    def piece(self, row: int, n: int) -> "PrefillPiece":
        """The next n prompt tokens of `row` (positions length .. length + n - 1)."""
        start = self.lengths[row]
        if start + n > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per row and row {row} already has {start}; "
                             f"{n} more do not fit (reserve more, up to max_tokens = {self.max_tokens})")
        self.lengths[row] = start + n
        return PrefillPiece(self, row, start, n)

    def step(self, positions: torch.Tensor, documents: torch.Tensor, end: int | None = None) -> "DecodeStep":
        """One token in each of the rows 0..n-1: row b's at `positions[b]` (its length) with document
        `documents[b]` (0 for a decoding row; EMPTY for an idle row, whose write is then invisible
        and overwritten by its next token). Host lengths are the caller's to advance. `end` bounds
        the global slots attended to (eager); None attends to all of them (one compiled graph at
        every length)."""
        return DecodeStep(self, positions, documents, self.capacity if end is None else end)


class PrefillPiece:
    """The KVCache protocol for n prompt tokens of one row: its queries see what the row cached
    before plus the piece itself; afterwards the ring keeps the piece's last ring_size tokens."""

    def __init__(self, cache: StaticKVCache, row: int, start: int, n: int):
        self.cache, self.row, self.start, self.n = cache, row, start, n
        end, c, r = start + n, cache, slice(row, row + 1)
        pos = torch.arange(start, end, device=c.device)[None]  # [1, n]
        doc = torch.zeros_like(pos)
        self.layout = TokenLayout(pos)  # the queries (document 0)
        c.full_pos[row, start:end], c.full_doc[row, start:end] = pos[0], 0
        self.full = TokenLayout(c.full_pos[r, :end], c.full_doc[r, :end])
        if start == 0:
            self.ring = TokenLayout(pos, doc)
        else:
            self.ring = TokenLayout(torch.cat([c.ring_pos[r], pos], 1), torch.cat([c.ring_doc[r], doc], 1))
        keep = min(n, c.ring_size)  # only the last ring_size tokens stay; their slots are distinct
        self.ring_write = torch.arange(end - keep, end, device=c.device) % c.ring_size
        c.ring_pos[row, self.ring_write], c.ring_doc[row, self.ring_write] = pos[0, n - keep:], 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout
               ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Stores k, v [1, n, K, Dh] of `layer`; returns the keys, values and layout its queries see."""
        c, row, start, end = self.cache, self.row, self.start, self.start + self.n
        ck, cv = c.k[layer], c.v[layer]
        if not c.is_ring[layer]:
            ck[row, start:end], cv[row, start:end] = k[0], v[0]
            return ck[row:row + 1, :end], cv[row:row + 1, :end], self.full
        keys, values = k, v
        if start:
            keys, values = torch.cat([ck[row:row + 1], k], 1), torch.cat([cv[row:row + 1], v], 1)
        keep = self.ring_write.numel()
        ck[row, self.ring_write], cv[row, self.ring_write] = k[0, self.n - keep:], v[0, self.n - keep:]
        return keys, values, self.ring


class DecodeStep:
    """The KVCache protocol for one token in each of rows 0..n-1, each written at its own position
    (a scatter: one index per row). The token is written first, then the query attends to the ring,
    which then holds everything it may see, or to the global slots up to `end`. Everything here is
    tensor operations, so a compiled step traces it into its graph."""

    def __init__(self, cache: StaticKVCache, positions: torch.Tensor, documents: torch.Tensor, end: int):
        c, n = cache, positions.shape[0]
        self.cache, self.n, self.end = cache, n, end
        self.rows = torch.arange(n, device=positions.device)
        self.positions, self.ring_slot = positions, positions % c.ring_size
        c.full_pos[self.rows, positions], c.full_doc[self.rows, positions] = positions, documents
        c.ring_pos[self.rows, self.ring_slot], c.ring_doc[self.rows, self.ring_slot] = positions, documents
        self.layout = TokenLayout(positions[:, None], documents[:, None])  # the queries
        self.full = TokenLayout(c.full_pos[:n, :end], c.full_doc[:n, :end])
        self.ring = TokenLayout(c.ring_pos[:n], c.ring_doc[:n])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout
               ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        c, n = self.cache, self.n
        ck, cv = c.k[layer], c.v[layer]
        if c.is_ring[layer]:
            ck[self.rows, self.ring_slot], cv[self.rows, self.ring_slot] = k[:, 0], v[:, 0]
            return ck[:n], cv[:n], self.ring
        ck[self.rows, self.positions], cv[self.rows, self.positions] = k[:, 0], v[:, 0]
        return ck[:n, :self.end], cv[:n, :self.end], self.full
