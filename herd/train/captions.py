"""Captioned images for the vision stages (SPEC 6), read from image-caption `Document`s.

The row-shaped stages (alignment, joint) pack these documents with `herd.data.packing.PackedLoader`
like any other data. Two things here are not rows:
- `ContrastivePairs`: N tiles with their captions (padded), for CLIP-style vision pretraining;
  batch k is a pure function of (seed, k), so its position in a checkpoint is the step alone;
- `generate_captions` / `caption_accuracy`: caption held-out images greedily and check the shapes
  they name against the scene.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from ..data.documents import Document
from ..data.packing import Batch
from ..data.synthetic import SHAPES, Scene
from ..model import Llama4
from ..tokenizer import Tokenizer


def caption_ids(doc: Document) -> np.ndarray:
    """The caption of a `<|begin_of_text|> image caption <|end_of_text|>` document."""
    return doc.tokens[doc.image_spans[-1].end:-1]


def image_prompt(doc: Document) -> np.ndarray:
    """The ids up to and including the image: what a model captions from."""
    return doc.tokens[:doc.image_spans[-1].end]


class ContrastivePairs:
    """Iterator of `Batch`es of `batch_size` distinct (tile, caption) pairs, captions right-padded."""

    def __init__(self, documents: Sequence[Document], batch_size: int, seed: int = 0):
        if any(len(d.image_spans) != 1 for d in documents):
            raise ValueError("contrastive pairs need documents of one image and its caption")
        self.documents, self.batch_size, self.seed, self.step = documents, batch_size, seed, 0

    def batch_at(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        pick = rng.choice(len(self.documents), size=min(self.batch_size, len(self.documents)), replace=False)
        caps = [caption_ids(self.documents[i]) for i in pick]
        ids = torch.zeros(len(caps), max(map(len, caps)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(caps):
            ids[r, :len(c)] = torch.from_numpy(c)
            mask[r, :len(c)] = 1
        pixels = torch.cat([self.documents[i].pixels() for i in pick])
        return Batch(input_ids=ids, attention_mask=mask, pixel_values=pixels)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        self.step += 1
        return self.batch_at(self.step - 1)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


# ------------------------------------------------------------------------------------------------
# Held-out captioning
# ------------------------------------------------------------------------------------------------

_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")


def generate_captions(model: Llama4, documents: Sequence[Document], tokenizer: Tokenizer, max_new_tokens: int = 48,
                      batch: int = 16) -> list[str]:
    """Greedy captions of the images of captioned-image documents (their captions unseen)."""
    from ..inference import generate

    out = []
    for s in range(0, len(documents), batch):
        docs = documents[s:s + batch]
        prompts = [image_prompt(d) for d in docs]
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("generate_captions batches images of one tile layout; give same-size images")
        prompt = torch.from_numpy(np.stack(prompts))
        pixels = torch.cat([d.pixels() for d in docs]).to(model.device)
        ids = generate(model, prompt, max_new_tokens, temperature=0.0, pixel_values=pixels,
                       stop_token_ids=[tokenizer.end_of_text_id])
        for row in ids[:, prompt.shape[1]:].tolist():
            out.append(tokenizer.decode(row, skip_special=True).strip())
    return out


def caption_accuracy(captions: list[str], scenes: Sequence[Scene]) -> dict:
    """How often the shapes a caption names are in the image, against guessing.

    `shape_precision`: fraction of named shapes present in the scene; chance is what naming a
    uniformly random shape would score, mean over scenes of (distinct shapes present / 3).
    `exact`: captions equal to the scene's own."""
    hits = named = exact = 0
    chance = 0.0
    for text, scene in zip(captions, scenes):
        present = {o.shape for o in scene.objects}
        words = _SHAPE_WORD.findall(text.lower())
        hits += sum(w in present for w in words)
        named += len(words)
        chance += len(present) / len(SHAPES)
        exact += text == scene.caption()
    n = max(len(captions), 1)
    return {"shape_precision": hits / max(named, 1), "shape_chance": chance / n, "shapes_named": named,
            "exact": exact / n, "n": len(captions)}
