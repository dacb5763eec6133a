"""Questions about the synthetic scenes the vision stages draw (herd.data.synthetic): the
multimodal task, so RL sees images as Meta's did.

Levels, one question kind each so that every kind gets a quarter of the problems: 1 = "How many
shapes are there?", 2 = "How many red shapes are there?", 3 = "What color is the triangle?" and
4 = "Where is the circle?" (the answer is a place such as "top left"); 3 and 4 ask only about a
shape the scene has exactly one of, so they must find it by its shape. The scene (generator seed
and index) is the split key, so held-out images are never seen in training. The worked answer
first describes the whole scene (its caption), then answers: the description is what the vision
stages taught.
"""

from __future__ import annotations

from ..data.synthetic import COLORS, SHAPES, answer_is_correct, make_scene
from .base import Problem, Task

SCENE_SEED = 7  # a generator of its own, apart from the scenes pretraining draws (seed 0)


class SceneQuestions(Task):
    name = "scenes"
    levels = (1, 2, 3, 4)
    vision = True

    def __init__(self, image_size: int = 64, max_objects: int = 4, num_scenes: int = 1_000_000):
        self.image_size, self.max_objects, self.num_scenes = image_size, max_objects, num_scenes

    def _candidate(self, rng, level: int) -> Problem | None:
        index = rng.randrange(self.num_scenes)
        scene = make_scene(index, SCENE_SEED, self.max_objects)
        if level == 1:
            question, answer = "How many shapes are there?", str(len(scene.objects))
        elif level == 2:
            color = rng.choice(list(COLORS))
            question, answer = f"How many {color} shapes are there?", str(scene.count(color=color))
        else:
            shape = rng.choice(SHAPES)
            alone = [o for o in scene.objects if o.shape == shape]
            if len(alone) != 1:
                return None  # the question would be ambiguous; draw another scene
            if level == 3:
                question, answer = f"What color is the {shape}?", alone[0].color
            else:
                question, answer = f"Where is the {shape}?", alone[0].place
        worked = f"I see {scene.caption()[0].lower()}{scene.caption()[1:]}\nAnswer: {answer}"
        return Problem(self.name, f"scene:{SCENE_SEED}:{index}", question, answer, worked, level,
                       image=scene.draw(self.image_size))

    def _same(self, given: str, truth: str) -> bool:
        return answer_is_correct(given.removeprefix("the ").removeprefix("The "), truth)
