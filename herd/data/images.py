"""Llama 4's image preprocessing: decode, tile, normalise, and the `<|image|>` token layout.

An image becomes a canvas of `rows x cols` square tiles (rows * cols <= max_tiles), chosen so the
image needs the least upscaling, or if every canvas is too small, the least downscaling; ties go to
the smaller canvas (less padding). The image is resized keeping its aspect ratio (never upscaled
past one tile side), padded black on the right and bottom, normalised to [-1, 1] and cut into tiles
row by row. With more than one tile a thumbnail of the whole image, squashed to one tile, comes last.

Each tile becomes `tokens_per_tile` image features (144 for 336-pixel tiles of 14-pixel patches
after the 2x2 pixel shuffle), so the prompt holds that many `<|patch|>` placeholders per tile,
framed by separators (SPEC 3):

    one tile:        <|image_start|> <|image|> P*n <|image_end|>
    rows x cols:     <|image_start|> (P*n <|tile_x_separator|>)... P*n <|tile_y_separator|>  (per row)
                     <|image|> P*n <|image_end|>                 (the thumbnail)

Departures from `transformers`' Llama4ImageProcessor, which this otherwise follows: resizing uses
Pillow's bilinear filter (not torchvision's, so pixels differ by rounding), and pixel values stay
float32 (it rounds them to bfloat16). Canvas scales are compared as exact fractions.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from ..config import VisionConfig
    from ..tokenizer import Tokenizer

# Larger images are refused before decoding (a small file can expand to gigabytes: a
# "decompression bomb"). 64 megapixels is far above anything 16 tiles of 336 pixels can use.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used: corrupt, truncated, too large, or not an image at all."""


def load_image(source: str | Path | bytes | Image.Image, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file, bytes or PIL image to RGB (first frame of an animation).

    Transparent images are composited over white, like `transformers`' convert_rgb.
    Every failure is an `ImageError` naming the file.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "<image bytes>")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")
        except OSError as e:
            raise ImageError(f"{name}: cannot open image file ({e.strerror or e})") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp)
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{name}: {width}x{height} image has more than {max_pixels} pixels "
                                     "(refused as a possible decompression bomb)")
                image.seek(0)
                image.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognised image format (PNG, JPEG, WebP, GIF, ...)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: refused as a possible decompression bomb ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways to say "corrupt"
            raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
        finally:
            if not isinstance(source, bytes):
                fp.close()
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name}: empty image ({image.width}x{image.height})")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def choose_canvas(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the canvas for an image of `height` x `width` pixels."""
    best: tuple[Fraction, int, int, int] | None = None  # (scale, area, rows, cols)
    upscale_possible = False
    candidates = []
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            # The limiting side decides how much the image can grow (or must shrink) undistorted.
            scale = min(Fraction(rows * tile_size, height), Fraction(cols * tile_size, width))
            candidates.append((scale, rows * cols, rows, cols))
            upscale_possible |= scale >= 1
    for scale, area, rows, cols in candidates:
        if upscale_possible and scale < 1:
            continue
        if best is None:
            best = (scale, area, rows, cols)
            continue
        # Least upscale (smallest scale >= 1), else least downscale (largest scale < 1).
        better = scale < best[0] if upscale_possible else scale > best[0]
        if better or (scale == best[0] and area < best[1]):
            best = (scale, area, rows, cols)
    assert best is not None
    return best[2], best[3]


def resized_size(height: int, width: int, rows: int, cols: int, tile_size: int) -> tuple[int, int]:
    """(height, width) the image is resized to inside a rows x cols canvas, aspect ratio kept.

    Small images grow only until one side reaches one tile (or their own size, if larger);
    large ones shrink to fit the canvas."""
    target_h = min(max(height, tile_size), rows * tile_size)
    target_w = min(max(width, tile_size), cols * tile_size)
    if Fraction(target_w, width) < Fraction(target_h, height):
        new_w, new_h = target_w, min(height * target_w // width, target_h)
    else:
        new_h, new_w = target_h, min(width * target_h // height, target_w)
    return max(new_h, 1), max(new_w, 1)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W] normalised to [-1, 1] (mean = std = 0.5)."""
    array = np.asarray(image, dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(array).permute(2, 0, 1).div(255.0).sub(0.5).div(0.5)


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [N_tiles, 3, S, S]: canvas tiles row-major, then the thumbnail
    rows: int
    cols: int

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


class ImageProcessor:
    """Tiles images for a vision tower with `tile_size`-pixel tiles of `patch_size`-pixel patches."""

    def __init__(self, tile_size: int = 336, patch_size: int = 14, max_tiles: int = 16,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if tile_size % patch_size or (tile_size // patch_size) % 2:
            raise ValueError(f"tile_size ({tile_size}) must be an even multiple of patch_size ({patch_size}) "
                             "for the 2x2 pixel shuffle")
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
        self.tile_size = tile_size
        self.patch_size = patch_size
        self.max_tiles = max_tiles
        self.max_pixels = max_pixels
        # 2x2 pixel shuffle: four patches become one token.
        self.tokens_per_tile = (tile_size // patch_size // 2) ** 2

    @classmethod
    def from_config(cls, vision: "VisionConfig", max_tiles: int = 16) -> "ImageProcessor":
        return cls(tile_size=vision.image_size, patch_size=vision.patch_size, max_tiles=max_tiles)

    def __call__(self, source: str | Path | bytes | Image.Image, *, name: str | None = None) -> ProcessedImage:
        image = load_image(source, name=name, max_pixels=self.max_pixels)
        s = self.tile_size
        rows, cols = choose_canvas(image.height, image.width, s, self.max_tiles)
        new_h, new_w = resized_size(image.height, image.width, rows, cols, s)
        canvas = Image.new("RGB", (cols * s, rows * s), (0, 0, 0))  # black pad right and bottom
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BILINEAR), (0, 0))
        full = _to_tensor(canvas)  # [3, rows*S, cols*S]
        # [3, rows*S, cols*S] -> [rows, cols, 3, S, S] -> [rows*cols, 3, S, S], row-major.
        tiles = full.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        if rows * cols > 1:
            thumbnail = _to_tensor(image.resize((s, s), Image.Resampling.BILINEAR))
            tiles = torch.cat([tiles, thumbnail[None]], dim=0)
        return ProcessedImage(tiles.contiguous(), rows, cols)

    def num_image_tokens(self, rows: int, cols: int) -> int:
        """Length of an image's token layout: 147 + 145 * rows * cols at 144 tokens per tile."""
        n = self.tokens_per_tile
        if rows * cols == 1:
            return n + 3
        return 3 + n + rows * cols * (n + 1)

    def image_tokens(self, rows: int, cols: int, tokenizer: "Tokenizer") -> list[int]:
        """The token layout that replaces one `<|image|>` of the chat template."""
        patches = [tokenizer.patch_id] * self.tokens_per_tile
        ids = [tokenizer.image_start_id]
        if rows * cols > 1:
            for _ in range(rows):
                for col in range(cols):
                    ids += patches
                    ids.append(tokenizer.tile_x_separator_id if col < cols - 1 else tokenizer.tile_y_separator_id)
        ids += [tokenizer.image_id] + patches + [tokenizer.image_end_id]
        assert len(ids) == self.num_image_tokens(rows, cols)
        return ids

    def encode(self, source: str | Path | bytes | Image.Image, tokenizer: "Tokenizer", *,
               name: str | None = None) -> tuple[list[int], torch.Tensor]:
        """One image -> (its token ids with `<|patch|>` placeholders, pixel_values [N_tiles, 3, S, S])."""
        processed = self(source, name=name)
        return self.image_tokens(processed.rows, processed.cols, tokenizer), processed.pixel_values
