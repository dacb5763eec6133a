"""Batch sources for the training loop: random windows of a packed token stream.

`TokenStream` concatenates tokenized documents, each closed by <|end_of_text|>, into one array with
a parallel array of document ids. `TextWindows` draws each step's windows at offsets fixed by
(seed, step): batch k is a pure function of k, so its position in a checkpoint is one integer, a
resumed run sees exactly the batches it would have seen, and a data-parallel rank simply takes its
slice of the global batch (so N processes see the same global batch as one).

Targets never cross a document boundary, and `document_ids` keeps attention inside each document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .losses import IGNORE, Batch


class TokenStream:
    def __init__(self, docs: Sequence[Sequence[int]], eos_id: int):
        lengths = [len(d) + 1 for d in docs]
        self.tokens = np.empty(sum(lengths), dtype=np.int64)
        self.doc_ids = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
        pos = 0
        for d, n in zip(docs, lengths):
            self.tokens[pos:pos + n - 1] = d
            self.tokens[pos + n - 1] = eos_id
            pos += n

    def __len__(self) -> int:
        return len(self.tokens)

    def unigram_entropy(self, other: "TokenStream", vocab_size: int) -> float:
        """Cross-entropy (nats/token) of `other` under this stream's add-one unigram distribution:
        the loss of a model that knows token frequencies and nothing else."""
        counts = np.bincount(self.tokens, minlength=vocab_size).astype(np.float64) + 1
        logp = np.log(counts / counts.sum())
        return float(-logp[other.tokens].mean())


class StepSource:
    """A batch source whose batch k is a pure function of k (`batch(k)`): iterating yields batches
    0, 1, 2, ... and its position in a checkpoint is the step alone."""

    step = 0

    def batch(self, step: int) -> Batch:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class TextWindows(StepSource):
    """Iterator of `Batch`es of `batch_size` windows of `seq_len` tokens (this rank's share)."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(stream) <= seq_len + 1:
            raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than seq_len + 1 "
                             f"({seq_len + 1}); give more data or lower --seq_len")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        n = self.batch_size * self.world_size
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, size=n)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # [B, T+1]
        tokens, docs = self.stream.tokens[idx], self.stream.doc_ids[idx]
        labels = np.where(docs[:, 1:] == docs[:, :-1], tokens[:, 1:], IGNORE)  # no cross-document target
        return Batch(input_ids=torch.from_numpy(tokens[:, :-1]), labels=torch.from_numpy(labels),
                     document_ids=torch.from_numpy(docs[:, :-1] - docs[:, :1]))
