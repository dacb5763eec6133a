"""A tokenized document: the unit the packer places into training sequences.

A document is the ids of one text, one conversation, or one image with its caption, plus:
- `target_mask`: which ids may be predicted. Image-layout ids (`<|patch|>`, separators, ...) never
  are; a conversation adds the chat renderer's loss mask (only what the assistant wrote).
- its images' tiles, in the order of its `<|patch|>` ids, and where each image's ids lie
  (`image_spans`), so the packer never splits an image between two sequences. Tiles may be given
  lazily (a callable), so a large image corpus need not sit in memory as pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

    from ..chat import RenderedChat
    from ..tokenizer import Tokenizer
    from .images import ImageProcessor

Pixels = torch.Tensor | Callable[[], torch.Tensor]


@dataclass(frozen=True)
class ImageSpan:
    start: int  # index of <|image_start|>
    end: int  # one past <|image_end|>
    first_tile: int  # this image's tiles are pixel_values[first_tile : first_tile + num_tiles]
    num_tiles: int


@dataclass
class Document:
    tokens: np.ndarray  # int64 [L]
    target_mask: np.ndarray  # bool [L]: token j may be a prediction target
    image_spans: tuple[ImageSpan, ...] = ()
    pixel_values: Pixels | None = None  # [N_tiles, 3, S, S], or a callable returning it

    def __len__(self) -> int:
        return len(self.tokens)

    def pixels(self) -> torch.Tensor:
        if self.pixel_values is None:
            raise ValueError("this document has no images")
        return self.pixel_values() if callable(self.pixel_values) else self.pixel_values

    @classmethod
    def from_ids(cls, ids: Sequence[int], tokenizer: "Tokenizer", *, tokens_per_tile: int | None = None,
                 loss_mask: Sequence[bool] | None = None, pixel_values: Pixels | None = None,
                 num_tiles: int | None = None) -> "Document":
        """Validate and index a token list. `tokens_per_tile` is needed when `ids` hold images;
        `num_tiles` (if known) is checked against the `<|patch|>` count without loading lazy pixels."""
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("a document needs a non-empty 1-D list of token ids")
        layout = np.isin(tokens, list(tokenizer.image_layout_ids))
        target_mask = ~layout
        if loss_mask is not None:
            if len(loss_mask) != len(tokens):
                raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
            target_mask &= np.asarray(loss_mask, dtype=bool)
        spans = _image_spans(tokens, tokenizer, tokens_per_tile)
        tiles = sum(s.num_tiles for s in spans)
        if spans and pixel_values is None:
            raise ValueError(f"the document has {len(spans)} image(s) but no pixel_values")
        if num_tiles is None and isinstance(pixel_values, torch.Tensor):
            num_tiles = pixel_values.shape[0]
        if num_tiles is not None and num_tiles != tiles:
            raise ValueError(f"the document's <|patch|> ids describe {tiles} tiles but pixel_values has "
                             f"{num_tiles}")
        return cls(tokens, target_mask, tuple(spans), pixel_values if spans else None)


def _image_spans(tokens: np.ndarray, tokenizer: "Tokenizer", tokens_per_tile: int | None) -> list[ImageSpan]:
    starts = np.flatnonzero(tokens == tokenizer.image_start_id).tolist()
    ends = np.flatnonzero(tokens == tokenizer.image_end_id).tolist()
    if len(starts) != len(ends) or any(not s < e for s, e in zip(starts, ends)) or any(
            e > s2 for e, s2 in zip(ends, starts[1:])):
        raise ValueError("unbalanced <|image_start|> / <|image_end|> ids in the document")
    if starts and not tokens_per_tile:
        raise ValueError("the document holds images: pass tokens_per_tile (VisionConfig.tokens_per_tile)")
    spans, tile = [], 0
    for s, e in zip(starts, ends):
        patches = int((tokens[s:e + 1] == tokenizer.patch_id).sum())
        if patches % tokens_per_tile:
            raise ValueError(f"image at token {s} has {patches} <|patch|> ids, not a multiple of "
                             f"{tokens_per_tile} tokens per tile")
        spans.append(ImageSpan(s, e + 1, tile, patches // tokens_per_tile))
        tile += patches // tokens_per_tile
    outside = int((tokens == tokenizer.patch_id).sum()) - sum(
        int((tokens[sp.start:sp.end] == tokenizer.patch_id).sum()) for sp in spans)
    if outside:
        raise ValueError(f"{outside} <|patch|> ids lie outside any <|image_start|>...<|image_end|>")
    return spans


# --------------------------------------------------------------------------------------------
# Builders for herd's three kinds of data
# --------------------------------------------------------------------------------------------

def text_document(text: str, tokenizer: "Tokenizer") -> Document:
    """<|begin_of_text|> text <|end_of_text|>: the model learns where documents end."""
    return Document.from_ids(tokenizer.encode(text, bos=True, eos=True), tokenizer)


def chat_document(rendered: "RenderedChat", tokenizer: "Tokenizer", tokens_per_tile: int | None = None) -> Document:
    """A rendered conversation; only what the assistant wrote is a target."""
    return Document.from_ids(rendered.ids, tokenizer, tokens_per_tile=tokens_per_tile,
                             loss_mask=rendered.loss_mask, pixel_values=rendered.pixel_values)


def image_text_document(image: "str | Path | bytes | Image.Image", text: str, tokenizer: "Tokenizer",
                        processor: "ImageProcessor", *, name: str | None = None,
                        lazy_pixels: Callable[[], torch.Tensor] | None = None) -> Document:
    """<|begin_of_text|> image text <|end_of_text|>: early-fusion pretraining on a captioned image.

    With `lazy_pixels` (a callable that reproduces the tiles), the document keeps that instead of
    the tiles themselves."""
    image_ids, pixels = processor.encode(image, tokenizer, name=name)
    ids = [tokenizer.bos_id] + image_ids + tokenizer.encode(text, eos=True)
    return Document.from_ids(ids, tokenizer, tokens_per_tile=processor.tokens_per_tile,
                             pixel_values=lazy_pixels or pixels, num_tiles=pixels.shape[0])
