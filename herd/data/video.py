"""Video as Llama 4 takes it: a short sequence of sampled frames, each an image in the prompt.

Llama 4 was pretrained on text, images and video (SPEC 1), and a prompt may hold several images,
each tiled and laid out in order (SPEC 3). herd gives a video the same path: `sample_frames` picks
frames, and the chat renders each as an image part (herd.chat: `{"type": "video", "video": ...}`),
so a clip of k frames costs k images' tokens.

Frame sampling: k frames at the centres of k equal spans of the clip, frame floor((i + 1/2) n / k)
for i = 0..k-1 of n (every frame, in order, when n <= k). Evenly spread, first and last spans
included, and the same frames for the same clip on every machine.

A clip is an animated image (GIF, WebP, APNG: a path, bytes or a PIL image) or a list of frames
(paths, bytes or PIL images).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageSequence

from .images import DEFAULT_MAX_PIXELS, ImageError, load_image

DEFAULT_FRAMES = 8


def frame_indices(total: int, frames: int) -> list[int]:
    """Which of `total` frames to keep: the centres of `frames` equal spans (all of them if fewer)."""
    if frames < 1:
        raise ValueError(f"a video needs at least 1 frame to sample, got frames={frames}")
    if total <= frames:
        return list(range(total))
    return [int((i + 0.5) * total / frames) for i in range(frames)]


def _animation_frames(source, name: str, max_pixels: int) -> list[Image.Image]:
    image = source if isinstance(source, Image.Image) else None
    if image is None:
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        except (OSError, ValueError) as e:
            raise ImageError(f"{name}: cannot read the video ({e})") from None
    return [load_image(frame.copy(), name=name, max_pixels=max_pixels) for frame in ImageSequence.Iterator(image)]


def sample_frames(source: str | Path | bytes | Image.Image | Sequence, frames: int = DEFAULT_FRAMES, *,
                  name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """The clip's sampled frames as RGB images, in order."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "<video>")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ImageError(f"{name}: a video given as a list of frames needs at least one frame")
        keep = frame_indices(len(source), frames)
        return [load_image(source[i], name=f"{name} frame {i}", max_pixels=max_pixels) for i in keep]
    if not isinstance(source, (str, Path, bytes, Image.Image)):
        raise ImageError(f"{name}: a video is an animated image (path, bytes, PIL) or a list of frames, "
                         f"got {type(source).__name__}")
    every = _animation_frames(source, name, max_pixels)
    return [every[i] for i in frame_indices(len(every), frames)]
