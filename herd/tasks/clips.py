"""Questions that need several images: a short clip (video frames) and a pair of pictures.

Level 1, a clip: "Which way did the circle move?" Four frames of 64x64 pixels in which one circle
moves in a straight line (left, right, up or down, 8 pixels a frame) past a few shapes that stay
put; the answer is the direction. Level 2, two pictures (scenes of herd.data.synthetic): "Which
picture has more shapes, the first or the second?" (never a tie). The clip or scene number is the
split key, so held-out clips are never seen in training.

`clip_documents` makes clips of the TRAIN split into early-fusion training documents for the
joint stage, in turn a circle that moves (the task's clip), a circle that appears, and a circle that
changes colour (`event_clip`): <|begin_of_text|> frame 1 ... frame 4 caption <|end_of_text|>, each frame one 64x64
tile (at the tiny model's tile size, 16 image tokens + 3 layout ids a frame: 76 for a clip, plus a
caption of about 15 tokens, so a clip fits a 128-token row). Only the caption is a target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from ..data.documents import Document
from ..data.images import ImageProcessor
from ..data.synthetic import BACKGROUND, COLORS, make_scene
from .base import Problem, Task, in_split

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

CLIP_SEED = 11  # a generator of its own, apart from the scenes of pretraining and of SceneQuestions
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FRAMES, STEP, RADIUS = 4, 8, 6  # frames per clip, pixels the circle moves per frame, its radius


def moving_circle(index: int, image_size: int = 64) -> tuple[list[Image.Image], str]:
    """Clip number `index`: its frames and the direction the circle moved."""
    frames, direction, _ = described_clip(index, image_size)
    return frames, direction


def described_clip(index: int, image_size: int = 64) -> tuple[list[Image.Image], str, str]:
    """Clip number `index`: its frames, the direction, and a caption of what happens in it."""
    rng = random.Random(f"clip:{CLIP_SEED}:{index}")
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    travel = STEP * (FRAMES - 1)
    margin = RADIUS + 2
    # the start leaves room for the whole path inside the frame
    x0 = rng.uniform(margin + max(0, -dx) * travel, image_size - margin - max(0, dx) * travel)
    y0 = rng.uniform(margin + max(0, -dy) * travel, image_size - margin - max(0, dy) * travel)
    color = rng.choice(list(COLORS))
    still = [(rng.uniform(4, image_size - 12), rng.uniform(4, image_size - 12), rng.choice(list(COLORS)))
             for _ in range(rng.randint(0, 2))]
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        pen = ImageDraw.Draw(image)
        for sx, sy, scolor in still:  # squares that stay put
            pen.rectangle((sx, sy, sx + 8, sy + 8), fill=COLORS[scolor])
        cx, cy = x0 + dx * STEP * t, y0 + dy * STEP * t
        pen.ellipse((cx - RADIUS, cy - RADIUS, cx + RADIUS, cy + RADIUS), fill=COLORS[color])
        frames.append(image)
    squares = {0: "", 1: " past a square", 2: " past two squares"}[len(still)]
    return frames, direction, f"A {color} circle moves {direction}{squares}."


EVENTS = ("moves", "appears", "changes colour")  # training clip `index` shows EVENTS[index % 3]
FRAME_WORDS = ("first", "second", "third", "fourth")


def event_clip(index: int, image_size: int = 64) -> tuple[list[Image.Image], str]:
    """Training clip number `index`: its frames and a caption of what happens in it."""
    event = EVENTS[index % len(EVENTS)]
    if event == "moves":  # the clips task's own clip: its test split stays held out
        frames, _, caption = described_clip(index, image_size)
        return frames, caption
    rng = random.Random(f"event:{CLIP_SEED}:{index}")
    x, y = rng.uniform(RADIUS + 2, image_size - RADIUS - 2), rng.uniform(RADIUS + 2, image_size - RADIUS - 2)
    first, then = rng.sample(list(COLORS), 2)
    change = rng.randint(1, FRAMES - 1)  # the first frame that shows the event
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        if event == "changes colour" or t >= change:
            color = COLORS[then if event == "appears" or t >= change else first]
            ImageDraw.Draw(image).ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS), fill=color)
        frames.append(image)
    if event == "appears":
        return frames, f"A {then} circle appears in the {FRAME_WORDS[change]} frame."
    return frames, f"A circle changes from {first} to {then} in the {FRAME_WORDS[change]} frame."


def clip_key(index: int) -> str:
    return f"clip:{CLIP_SEED}:{index}"


@dataclass(frozen=True)
class ClipPixels:
    """Redraws clip `index` and tiles its frames, in order (a document keeps this, not the pixels)."""
    index: int
    image_size: int
    processor: ImageProcessor

    def __call__(self) -> torch.Tensor:
        frames = event_clip(self.index, self.image_size)[0]
        return torch.cat([self.processor(frame).pixel_values for frame in frames])


def clip_documents(tokenizer: "Tokenizer", processor: ImageProcessor, count: int) -> list[Document]:
    """The first `count` clips of ClipQuestions' TRAIN split as captioned videos:
    <|begin_of_text|> frames caption <|end_of_text|>; the frames' ids are never targets, so only
    the caption is. Held-out (test) clips are skipped, so the clips task's test problems stay unseen."""
    size = processor.tile_size
    docs, index = [], 0
    while len(docs) < count:
        if in_split(clip_key(index), "train", ClipQuestions.test_fraction):
            frames, caption = event_clip(index, size)
            ids, tiles = [tokenizer.bos_id], 0
            for frame in frames:
                frame_ids, pixels = processor.encode(frame, tokenizer)
                ids += frame_ids
                tiles += pixels.shape[0]
            ids += tokenizer.encode(caption, eos=True)
            docs.append(Document.from_ids(ids, tokenizer, tokens_per_tile=processor.tokens_per_tile,
                                          pixel_values=ClipPixels(index, size, processor), num_tiles=tiles))
        index += 1
    return docs


class ClipQuestions(Task):
    name = "clips"
    levels = (1, 2)
    vision = True

    def __init__(self, image_size: int = 64, num_clips: int = 1_000_000):
        self.image_size, self.num_clips = image_size, num_clips

    def _candidate(self, rng, level: int) -> Problem | None:
        index = rng.randrange(self.num_clips)
        if level == 1:
            frames, direction = moving_circle(index, self.image_size)
            return Problem(self.name, clip_key(index), "Which way did the circle move?", direction,
                           f"The circle moves {direction} from frame to frame.\nAnswer: {direction}", level,
                           video=tuple(frames))
        first, second = make_scene(2 * index, CLIP_SEED), make_scene(2 * index + 1, CLIP_SEED)
        if len(first.objects) == len(second.objects):
            return None  # no answer; draw another
        answer = "first" if len(first.objects) > len(second.objects) else "second"
        worked = (f"The first picture has {len(first.objects)} shapes and the second {len(second.objects)}.\n"
                  f"Answer: {answer}")
        return Problem(self.name, f"pair:{CLIP_SEED}:{index}",
                       "Which picture has more shapes, the first or the second?", answer, worked, level,
                       images=(first.draw(self.image_size), second.draw(self.image_size)))

    def _same(self, given: str, truth: str) -> bool:
        return given.strip().rstrip(".").lower().removeprefix("the ").split(" ")[0] == truth
