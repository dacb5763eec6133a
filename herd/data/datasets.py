"""Whole corpora as lists of `Document`s, ready for `PackedLoader`: what a training recipe calls.

- `stdlib_documents`, `text_documents`: the embedded code corpus, or any texts (pretraining text);
- `scene_documents`: the embedded image-text corpus, as captions (pretraining) or Q&A chats (SFT);
- `user_documents`: a user's folder or JSONL, every record kind, with the skip/stop error policy.

Images are not kept in memory as pixels: a document holds a small callable that redraws the scene
(or re-reads the file) when its batch is built. Each image is decoded once up front, so bad files
are reported while building, not halfway through training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..chat import render_chat
from .curation import exact_dedup
from .corpora import ChatDoc, ImageTextDoc, InputErrors, OnError, TextDoc, read_user_data, stdlib_texts
from .documents import Document, chat_document, image_text_document, text_document
from .images import ImageError, ImageProcessor
from .synthetic import Scene, synthetic_scenes

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class ScenePixels:
    """Redraws a synthetic scene and tiles it (deterministic, so identical every time)."""
    scene: Scene
    image_size: int
    processor: ImageProcessor

    def __call__(self) -> torch.Tensor:
        return self.processor(self.scene.draw(self.image_size)).pixel_values


@dataclass(frozen=True)
class FilePixels:
    """Re-reads an image file and tiles it."""
    path: Path
    processor: ImageProcessor

    def __call__(self) -> torch.Tensor:
        return self.processor(self.path).pixel_values


def stdlib_documents(tokenizer: "Tokenizer", split: Literal["train", "validation"] = "train", *,
                     max_files: int | None = None, max_bytes: int | None = None) -> list[Document]:
    """Each distinct stdlib source file as <|begin_of_text|> code <|end_of_text|> (the stdlib holds
    a few exact copies, e.g. identical test helpers; they are kept once)."""
    texts, _ = exact_dedup([doc.text for doc in stdlib_texts(split, max_files=max_files, max_bytes=max_bytes)])
    return text_documents(texts, tokenizer)


def text_documents(texts: list[str], tokenizer: "Tokenizer") -> list[Document]:
    """Each text as <|begin_of_text|> text <|end_of_text|> (`text_document`, tokenized in one batch)."""
    return [Document.from_ids([tokenizer.bos_id] + ids + [tokenizer.end_of_text_id], tokenizer)
            for ids in tokenizer.encode_batch(texts)]


def scene_documents(tokenizer: "Tokenizer", processor: ImageProcessor, count: int, *,
                    kind: Literal["caption", "qa"] = "caption", seed: int = 0, start: int = 0,
                    image_size: int | None = None) -> list[Document]:
    """Synthetic scenes `start ... start + count - 1` as documents.

    kind="caption": <|begin_of_text|> image caption <|end_of_text|>, every text token a target.
    kind="qa": a multi-turn chat of all the scene's questions; only the answers are targets."""
    if kind not in ("caption", "qa"):
        raise ValueError(f"kind must be 'caption' or 'qa', got {kind!r}")
    size = image_size or processor.tile_size
    docs = []
    for sample in synthetic_scenes(count, seed=seed, start=start, image_size=size):
        pixels = ScenePixels(sample.scene, size, processor)
        if kind == "caption":
            docs.append(image_text_document(sample.image, sample.caption, tokenizer, processor, lazy_pixels=pixels))
        else:
            rendered = render_chat(sample.conversation(), tokenizer, image_processor=processor)
            docs.append(Document.from_ids(rendered.ids, tokenizer, tokens_per_tile=processor.tokens_per_tile,
                                          loss_mask=rendered.loss_mask, pixel_values=pixels,
                                          num_tiles=rendered.pixel_values.shape[0]))
    return docs


def user_documents(path: str | Path, tokenizer: "Tokenizer", processor: ImageProcessor | None = None, *,
                   on_error: OnError = "stop") -> list[Document]:
    """Every record of a user's data as a document. Image records need `processor`; a bad image or
    an invalid conversation is reported with its file and line, like a bad JSON line."""
    errors = InputErrors(on_error)
    docs = []
    for record in read_user_data(path, errors=errors):
        try:
            if isinstance(record, TextDoc):
                docs.append(text_document(record.text, tokenizer))
            elif isinstance(record, ChatDoc):
                rendered = render_chat(record.messages, tokenizer, image_processor=processor)
                docs.append(chat_document(rendered, tokenizer, processor.tokens_per_tile if processor else None))
            elif isinstance(record, ImageTextDoc):
                if processor is None:
                    raise ValueError("an image-text record needs an image processor (pass processor=...)")
                # Decoded once now, so that bad files surface here rather than mid-training.
                docs.append(image_text_document(record.image, record.text, tokenizer, processor,
                                                lazy_pixels=FilePixels(record.image, processor)))
        except (ImageError, ValueError) as e:
            errors(record.source, str(e))
        except Exception as e:  # not a data problem: let it propagate, but say which record
            e.add_note(f"herd: while building a document from {record.source}")
            raise
    errors.print_summary()
    return docs
