"""Packing documents into fixed-length training sequences, and the resumable sharded loader: the
one road from data into the training loop for every row-shaped stage (text, captions, chats).

Each epoch, documents are shuffled (seeded by seed and epoch) and laid end to end into rows of
`seq_len` tokens. A document longer than the room left in a row continues in the next row, except
that an image's ids are never split: if an image does not fit in what is left of a row, the row is
padded and the image starts the next one. With `whole_documents`, a document that fits in a row is
never split either (a caption stays with its image, a conversation with its prompt). Rows are then
shuffled too, so that a batch does not hold consecutive pieces of one long file.

Per token, a `Batch` carries (B rows, T = seq_len):
- `input_ids` [B, T]: document ids, `pad_id` on padding;
- `labels` [B, T] (already shifted): the next id of the same document (even when that id starts the next row),
  or `IGNORE` at a document's last id, on padding, and where the document's target mask
  says no (image-layout ids, or in a conversation everything the assistant did not write);
- `document_ids` [B, T]: 0, 1, 2, ... for the pieces of each row, -1 on padding. Attention stays
  inside a piece: pieces of different documents never see each other;
- `position_ids` [B, T]: restart at 0 at the start of every piece;
- `pixel_values` [N, 3, S, S]: the tiles of every image in the batch, in the order of their
  `<|patch|>` ids reading the rows in order (or None without images; with `tile_shape`, an empty
  [0, 3, S, S] instead, so that every data-parallel rank runs the vision tower each step: under
  FSDP2 its weights are gathered with collectives that all ranks must join).

Every token of every document is an input exactly once per epoch. For data parallelism each
global batch of world_size * B rows is split into contiguous blocks of B rows, one per rank, and
the last global batch is filled with padding rows so that every rank runs the same number of steps.
So the global batch is the same for any number of ranks (world_size * B fixed), and batch k of an
epoch is a pure function of (documents, seed, epoch, k): a checkpoint stores (epoch, k) and a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model.head_loss import IGNORE  # label of a position that is not a target (cross_entropy's default)
from .documents import Document


@dataclass(frozen=True)
class Piece:
    doc: int  # index into the loader's documents
    start: int  # token range [start, end) of that document
    end: int


def pack_rows(documents: Sequence[Document], order: Sequence[int], seq_len: int,
              whole_documents: bool = False) -> list[list[Piece]]:
    """Lay documents (in `order`) into rows of at most `seq_len` tokens, never splitting an image
    (nor, with `whole_documents`, a document that fits in one row)."""
    rows: list[list[Piece]] = []
    row: list[Piece] = []
    fill = 0
    for d in order:
        doc = documents[d]
        pos = 0
        if whole_documents and fill and fill + len(doc) > seq_len >= len(doc):  # it fits in a fresh row
            rows.append(row)
            row, fill = [], 0
        while pos < len(doc):
            cut = min(len(doc), pos + seq_len - fill)
            for span in doc.image_spans:  # move a cut that falls inside an image to its start
                if span.start < cut < span.end:
                    cut = span.start
                    break
            if cut == pos:  # the image starting here does not fit in what is left of this row
                if fill == 0:
                    span = next(s for s in doc.image_spans if s.start == pos)
                    raise ValueError(f"an image of {span.end - span.start} tokens (document {d}) does not "
                                     f"fit in seq_len={seq_len}; raise seq_len or lower max_tiles")
                rows.append(row)
                row, fill = [], 0
                continue
            row.append(Piece(d, pos, cut))
            fill += cut - pos
            pos = cut
            if fill == seq_len:
                rows.append(row)
                row, fill = [], 0
    if row:
        rows.append(row)
    return rows


@dataclass
class Batch:
    """What every loss reads. Row-shaped stages fill input_ids, labels, document_ids and position_ids;
    a stage of padded rows (the contrastive captions) gives attention_mask instead."""
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor | None = None  # [B, T] int64: the next token, IGNORE where not trained
    position_ids: torch.Tensor | None = None  # [B, T] int64
    document_ids: torch.Tensor | None = None  # [B, T] int64, -1 on padding
    pixel_values: torch.Tensor | None = None  # [N_tiles, 3, S, S], in the order of the <|patch|> ids
    attention_mask: torch.Tensor | None = None  # [B, T] 1 = real token

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.document_ids),
                     move(self.pixel_values), move(self.attention_mask))

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @staticmethod
    def stack(batches: "Sequence[Batch]") -> "Batch":
        """The rows of several batches of the same length, in order (and their tiles in that order)."""
        def cat(name):
            parts = [getattr(b, name) for b in batches if getattr(b, name) is not None]
            return torch.cat(parts) if parts else None
        return Batch(*(cat(f) for f in ("input_ids", "labels", "position_ids", "document_ids", "pixel_values",
                                        "attention_mask")))


class PackedLoader:
    """Iterates over batches of packed rows, epoch after epoch; `state_dict()` resumes exactly."""

    def __init__(self, documents: Sequence[Document], *, seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, whole_documents: bool = False,
                 tile_shape: tuple[int, int, int] | None = None):
        if not documents:
            raise ValueError("PackedLoader needs at least one document")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.documents = documents
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.whole_documents = whole_documents
        self.tile_shape = tile_shape  # (C, S, S): batches without images carry empty pixel_values
        self.epoch = 0
        self.batch = 0  # the next batch of this epoch to yield
        self._rows_epoch: int | None = None
        self._rows: list[list[Piece]] = []

    # -- layout ---------------------------------------------------------------------------------

    def rows(self, epoch: int) -> list[list[Piece]]:
        """All ranks' rows of one epoch, in order (the same on every rank)."""
        if self._rows_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.documents)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            rows = pack_rows(self.documents, order.tolist(), self.seq_len, self.whole_documents)
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            self._rows, self._rows_epoch = rows, epoch
        return self._rows

    def batches_per_epoch(self) -> int:
        """Steps per epoch, the same for every rank."""
        return math.ceil(len(self.rows(self.epoch)) / (self.batch_size * self.world_size))

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            if self.batch < self.batches_per_epoch():
                batch = self.batch_at(self.epoch, self.batch)
                self.batch += 1  # state_dict() between steps points at the next batch
                return batch
            self.epoch, self.batch = self.epoch + 1, 0
        raise StopIteration

    def batch_at(self, epoch: int, index: int) -> Batch:
        """This rank's share of global batch `index` of `epoch` (a pure function of its arguments)."""
        first = (index * self.world_size + self.rank) * self.batch_size
        return self._collate(self.rows(epoch)[first:first + self.batch_size])

    def _collate(self, rows: list[list[Piece]]) -> Batch:
        b, t = self.batch_size, self.seq_len
        inputs = np.full((b, t), self.pad_id, dtype=np.int64)
        targets = np.full((b, t), IGNORE, dtype=np.int64)
        positions = np.zeros((b, t), dtype=np.int64)
        doc_ids = np.full((b, t), -1, dtype=np.int64)
        tiles: list[torch.Tensor] = []
        for r, row in enumerate(rows):  # rows past the end of the epoch stay padding
            fill = 0
            for k, piece in enumerate(row):
                doc = self.documents[piece.doc]
                n = piece.end - piece.start
                inputs[r, fill:fill + n] = doc.tokens[piece.start:piece.end]
                nxt = np.arange(piece.start + 1, piece.end + 1)
                inside = nxt < len(doc)  # the document's last token predicts nothing
                nxt = np.minimum(nxt, len(doc) - 1)
                targets[r, fill:fill + n] = np.where(inside & doc.target_mask[nxt], doc.tokens[nxt], IGNORE)
                positions[r, fill:fill + n] = np.arange(n)
                doc_ids[r, fill:fill + n] = k
                spans = [s for s in doc.image_spans if piece.start <= s.start and s.end <= piece.end]
                if spans:
                    pixels = doc.pixels()
                    tiles += [pixels[s.first_tile:s.first_tile + s.num_tiles] for s in spans]
                fill += n
        if not tiles and self.tile_shape is not None:
            tiles = [torch.zeros(0, *self.tile_shape)]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(positions),
                     torch.from_numpy(doc_ids), torch.cat(tiles) if tiles else None)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "num_documents": len(self.documents),
                "whole_documents": self.whole_documents}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "seq_len", "num_documents", "whole_documents"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)} but this loader has {mine}; "
                                 "resuming exactly needs the same data and layout")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class Mixture:
    """Batches whose rows come from several loaders in fixed numbers (joint training: code rows and
    image-caption rows), stacked in the order given; resumes like its loaders."""

    def __init__(self, *loaders: PackedLoader):
        if not loaders or len({loader.seq_len for loader in loaders}) != 1:
            raise ValueError("Mixture needs at least one loader, all with the same seq_len")
        self.loaders = loaders

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return Batch.stack([next(loader) for loader in self.loaders])

    def state_dict(self) -> dict:
        return {"loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["loaders"]) != len(self.loaders):
            raise ValueError(f"mixture state holds {len(state['loaders'])} loaders, this mixture {len(self.loaders)}")
        for loader, s in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(s)
