"""Synthetic image-text data: small scenes of coloured shapes, with captions and checkable Q&A.

The embedded image-text corpus, so multimodal training needs no download. The vocabulary is small
and explicit (3 shapes, 4 colours, 2 sizes, 9 places on a 3x3 grid, 1-4 objects) so that a tiny
model can learn it, and every answer is a single word or number computed from the scene itself,
so a model's answers can be checked exactly.

Scene `index` of generator `seed` is always the same scene: each one draws from its own
`random.Random` seeded by the string "seed:index" (string seeds are hashed with SHA-512, not with
Python's salted `hash`), so scenes can be made in any order, in parallel, or skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = {"small": 0.45, "large": 0.85}  # diameter as a fraction of a grid cell
PLACES = (("top left", "top", "top right"),
          ("left", "center", "right"),
          ("bottom left", "bottom", "bottom right"))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int  # grid cell, 0..2 from the top
    col: int  # 0..2 from the left

    @property
    def place(self) -> str:
        return PLACES[self.row][self.col]

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row-major grid cells)
    seed: int
    index: int

    def draw(self, image_size: int = 64) -> Image.Image:
        # Each object gets its own cell, so shapes never overlap and counts are unambiguous; a
        # small per-object offset (from the scene's rng) keeps positions from being pixel-identical.
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        pen = ImageDraw.Draw(image)
        cell = image_size / 3
        rng = random.Random(f"{self.seed}:{self.index}:jitter")
        for obj in self.objects:
            d = SIZES[obj.size] * cell
            slack = (cell - d) / 2
            cx = (obj.col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
            cy = (obj.row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
            box = (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                pen.ellipse(box, fill=fill)
            elif obj.shape == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        return image

    def caption(self) -> str:
        parts = [f"{obj.describe()} at the {obj.place}" for obj in self.objects]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return joined[0].upper() + joined[1:] + "."

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color)
                   for o in self.objects)

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs whose answers follow from the scene; answers are one word."""
        rng = random.Random(f"{self.seed}:{self.index}:questions")
        qa = [("How many shapes are there?", str(len(self.objects)))]
        shape = rng.choice(SHAPES)
        qa.append((f"How many {shape}s are there?", str(self.count(shape=shape))))
        color = rng.choice(list(COLORS))
        qa.append((f"How many {color} shapes are there?", str(self.count(color=color))))
        obj = rng.choice(self.objects)
        qa.append((f"What color is the shape at the {obj.place}?", obj.color))
        qa.append((f"What shape is at the {obj.place}?", obj.shape))
        qa.append((f"Is the {obj.shape} at the {obj.place} small or large?", obj.size))
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        qa.append((f"Is there a {color} {shape}?", "yes" if self.count(shape, color) else "no"))
        return qa


def make_scene(index: int, seed: int = 0, max_objects: int = 4) -> Scene:
    """Scene number `index` of the generator `seed`."""
    if not 1 <= max_objects <= 9:
        raise ValueError(f"max_objects must be between 1 and 9 (cells of the 3x3 grid), got {max_objects}")
    rng = random.Random(f"{seed}:{index}")
    cells = sorted(rng.sample(range(9), rng.randint(1, max_objects)))
    objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                                cell // 3, cell % 3) for cell in cells)
    return Scene(objects, seed, index)


@dataclass(frozen=True)
class SceneSample:
    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    scene: Scene

    def chat(self, question: int = 0) -> list[dict]:
        """One Q&A pair as a conversation: the user shows the image and asks, the assistant answers."""
        q, a = self.qa[question]
        return [{"role": "user", "content": [{"type": "image", "image": self.image}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": a}]

    def conversation(self) -> list[dict]:
        """Every Q&A pair about the image in one multi-turn chat (the image is shown once)."""
        messages = self.chat(0)
        for q, a in self.qa[1:]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages


def synthetic_scenes(count: int, *, seed: int = 0, start: int = 0, image_size: int = 64,
                     max_objects: int = 4) -> Iterator[SceneSample]:
    """Scenes start, start + 1, ..., start + count - 1 of generator `seed`, drawn and described."""
    for index in range(start, start + count):
        scene = make_scene(index, seed, max_objects)
        yield SceneSample(scene.draw(image_size), scene.caption(), scene.questions(), scene)


def scene_concepts() -> list[str]:
    """Concepts for MetaCLIP balancing of scene captions: every colour-shape pair ("red circle")."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def answer_is_correct(predicted: str, truth: str) -> bool:
    """Lenient exact match: case, surrounding space and a final full stop are ignored, and number
    words count as digits ("Three." == "3")."""
    def norm(s: str) -> str:
        s = s.strip().rstrip(".").strip().lower()
        return str(NUMBER_WORDS.index(s)) if s in NUMBER_WORDS else s
    return norm(predicted) == norm(truth)
