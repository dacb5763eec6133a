"""Image-caption data for the vision stages (SPEC 6), from herd's synthetic scenes.

`SceneSet` draws a range of scenes once and keeps, per scene, its tiles, its image token layout
and its caption ids. Two batch sources read it:
- `ContrastivePairs`: N tiles with their captions (padded), for CLIP-style vision pretraining;
- `CaptionRows`: early-fusion rows `<|begin_of_text|> image caption <|end_of_text|>`, several per
  row as packed documents; only caption tokens (and the end of text) are targets.
Like `TextWindows`, batch k is a pure function of (seed, k), so resuming needs only the step.
`caption_accuracy` captions held-out scenes greedily and checks the shapes named.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..data.images import ImageProcessor
from ..data.synthetic import SHAPES, synthetic_scenes
from ..model import Llama4
from ..tokenizer import Tokenizer
from .losses import IGNORE, Batch
from .sources import StepSource


class SceneSet:
    def __init__(self, tokenizer: Tokenizer, image_size: int, patch_size: int, count: int, start: int = 0,
                 seed: int = 0):
        processor = ImageProcessor(tile_size=image_size, patch_size=patch_size, max_tiles=1)
        self.tokenizer = tokenizer
        self.pixels, self.image_ids, self.caption_ids, self.scenes = [], [], [], []
        for sample in synthetic_scenes(count, seed=seed, start=start, image_size=image_size):
            ids, pixels = processor.encode(sample.image, tokenizer)
            self.image_ids.append(ids)
            self.pixels.append(pixels)  # [1, 3, S, S]: one tile
            self.caption_ids.append(tokenizer.encode(sample.caption))
            self.scenes.append(sample.scene)
        self.image_prompt = [tokenizer.bos_id] + self.image_ids[0]  # the same for every 1-tile image

    def __len__(self) -> int:
        return len(self.scenes)

    def row_doc(self, i: int) -> tuple[list[int], list[bool]]:
        """Ids and target mask of one scene as a document: bos, image, caption, eos."""
        caption = self.caption_ids[i] + [self.tokenizer.end_of_text_id]
        ids = self.image_prompt + caption
        return ids, [False] * len(self.image_prompt) + [True] * len(caption)


class ContrastivePairs(StepSource):
    def __init__(self, scenes: SceneSet, batch_size: int, seed: int = 0):
        self.scenes, self.batch_size, self.seed = scenes, batch_size, seed

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        pick = rng.choice(len(self.scenes), size=min(self.batch_size, len(self.scenes)), replace=False)
        caps = [self.scenes.caption_ids[i] for i in pick]
        L = max(map(len, caps))
        ids = torch.zeros(len(caps), L, dtype=torch.long)
        mask = torch.zeros(len(caps), L, dtype=torch.long)
        for r, c in enumerate(caps):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        pixels = torch.cat([self.scenes.pixels[i] for i in pick])
        return Batch(input_ids=ids, attention_mask=mask, pixel_values=pixels)


class CaptionRows(StepSource):
    """Rows of `seq_len` holding as many captioned images as fit, each its own document."""

    def __init__(self, scenes: SceneSet, batch_size: int, seq_len: int, pad_id: int, seed: int = 0):
        self.scenes, self.batch_size, self.seq_len, self.pad_id, self.seed = scenes, batch_size, seq_len, pad_id, seed

    def rows(self, step: int, n: int) -> Batch:
        ids = np.full((n, self.seq_len + 1), self.pad_id, dtype=np.int64)
        target = np.zeros((n, self.seq_len + 1), dtype=bool)
        docs = np.zeros((n, self.seq_len + 1), dtype=np.int64)
        pixels = []
        for r in range(n):
            rng = np.random.default_rng([self.seed, step, r])
            pos, doc = 0, 0
            while True:
                i = int(rng.integers(len(self.scenes)))
                doc_ids, doc_mask = self.scenes.row_doc(i)
                if pos + len(doc_ids) > self.seq_len + 1:
                    if pos == 0:
                        raise ValueError(f"seq_len {self.seq_len} is too short for one captioned image "
                                         f"({len(doc_ids)} tokens); raise --seq_len")
                    break
                ids[r, pos:pos + len(doc_ids)] = doc_ids
                target[r, pos:pos + len(doc_ids)] = doc_mask
                docs[r, pos:pos + len(doc_ids)] = doc
                pixels.append(self.scenes.pixels[i])
                pos, doc = pos + len(doc_ids), doc + 1
            docs[r, pos:] = doc  # the padding tail is a document of its own, never a target
        labels = np.where(target[:, 1:] & (docs[:, 1:] == docs[:, :-1]), ids[:, 1:], IGNORE)
        return Batch(input_ids=torch.from_numpy(ids[:, :-1]), labels=torch.from_numpy(labels),
                     document_ids=torch.from_numpy(docs[:, :-1]), pixel_values=torch.cat(pixels))

    def batch(self, step: int) -> Batch:
        return self.rows(step, self.batch_size)


class Mixture(StepSource):
    """Joint early-fusion batches: `caption_rows` rows of captions on top of code windows."""

    def __init__(self, text, captions: CaptionRows, caption_rows: int):
        self.text, self.captions, self.caption_rows = text, captions, caption_rows

    def batch(self, step: int) -> Batch:
        t = self.text.batch(step)
        c = self.captions.rows(step, self.caption_rows)
        n_text = t.input_ids.shape[0] - self.caption_rows
        cat = lambda a, b: torch.cat([a[:n_text], b])  # noqa: E731
        return Batch(input_ids=cat(t.input_ids, c.input_ids), labels=cat(t.labels, c.labels),
                     document_ids=cat(t.document_ids, c.document_ids), pixel_values=c.pixel_values)


# ------------------------------------------------------------------------------------------------
# Held-out captioning
# ------------------------------------------------------------------------------------------------

_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")


def generate_captions(model: Llama4, scenes: SceneSet, max_new_tokens: int = 48, batch: int = 16) -> list[str]:
    from ..inference import generate

    out = []
    for s in range(0, len(scenes), batch):
        idx = range(s, min(s + batch, len(scenes)))
        prompt = torch.tensor([scenes.image_prompt] * len(idx))
        pixels = torch.cat([scenes.pixels[i] for i in idx]).to(model.device)
        ids = generate(model, prompt, max_new_tokens, temperature=0.0, pixel_values=pixels,
                       stop_token_ids=[scenes.tokenizer.end_of_text_id])
        for row in ids[:, prompt.shape[1]:].tolist():
            out.append(scenes.tokenizer.decode(row, skip_special=True).strip())
    return out


def caption_accuracy(captions: list[str], scenes: SceneSet) -> dict:
    """How often the shapes a caption names are in the image, against guessing.

    `shape_precision`: fraction of named shapes present in the scene; chance is what naming a
    uniformly random shape would score, mean over scenes of (distinct shapes present / 3).
    `exact`: captions equal to the scene's own."""
    hits = named = exact = 0
    chance = 0.0
    for text, scene in zip(captions, scenes.scenes):
        present = {o.shape for o in scene.objects}
        words = _SHAPE_WORD.findall(text.lower())
        hits += sum(w in present for w in words)
        named += len(words)
        chance += len(present) / len(SHAPES)
        exact += text == scene.caption()
    n = max(len(captions), 1)
    return {"shape_precision": hits / max(named, 1), "shape_chance": chance / n, "shapes_named": named,
            "exact": exact / n, "n": len(captions)}
