import collections
import io

import pytest
import torch
from PIL import Image

from herd.data.images import ImageError, ImageProcessor, choose_canvas, load_image, resized_size


def _png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# (width, height) -> (cols, rows): the SPEC examples, then odd sizes.
@pytest.mark.parametrize("size, grid", [
    ((500, 800), (2, 3)),      # SPEC: 2x3 + thumbnail = 7 tiles, fits without resizing
    ((2000, 3000), (3, 5)),    # SPEC: 3x5 + 1 = 16, the least downscale
    ((336, 336), (1, 1)),
    ((1, 1), (1, 1)),          # grows to one tile
    ((10000, 10), (16, 1)),    # very wide: a 1x16 strip
    ((10, 10000), (1, 16)),    # very tall
    ((700, 300), (3, 1)),      # 2.33:1 needs no upscale on a 3x1 canvas (scale 1.12)
    ((400, 400), (2, 2)),      # least upscale 1.68 on 2x2; 1x2, 2x1 would need downscaling
])
def test_canvas_choice(size, grid):
    width, height = size
    rows, cols = choose_canvas(height, width, 336, 16)
    assert (cols, rows) == grid
    assert rows * cols <= 16


def test_ties_go_to_the_smaller_canvas():
    # A 336x336 image fits 1x1, 1x2, 2x2... all at scale 1; the smallest area wins.
    assert choose_canvas(336, 336, 336, 16) == (1, 1)
    # 200 high x 300 wide at tile 224 (the transformers docstring example): 1x2 beats 3x1.
    assert choose_canvas(200, 300, 224, 5) == (1, 2)


def test_resize_keeps_aspect_and_never_upscales_past_a_tile():
    assert resized_size(800, 500, 3, 2, 336) == (800, 500)  # fits: untouched
    assert resized_size(1, 1, 1, 1, 336) == (336, 336)  # small images grow to one tile side
    assert resized_size(3000, 2000, 5, 3, 336) == (1512, 1008)  # width limits: 2000 * 0.504
    assert resized_size(10, 10000, 1, 16, 336) == (5, 5376)  # very wide: shrinks to 16 tiles wide


def test_spec_examples_tiles_and_tokens(tok):
    proc = ImageProcessor(tile_size=336, patch_size=14)
    assert proc.tokens_per_tile == 144
    out = proc(Image.new("RGB", (500, 800), (255, 0, 0)))
    assert (out.rows, out.cols) == (3, 2) and out.pixel_values.shape == (7, 3, 336, 336)
    assert out.pixel_values.dtype == torch.float32
    ids = proc.image_tokens(out.rows, out.cols, tok)
    assert len(ids) == 147 + 145 * 6
    assert proc(Image.new("RGB", (2000, 3000))).pixel_values.shape == (16, 3, 336, 336)


def test_tiles_are_row_major_padded_black_and_normalised():
    proc = ImageProcessor(tile_size=64, patch_size=8, max_tiles=16)
    # 128 wide x 64 high, left half white, right half black: a 1x2 canvas, no resizing.
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 64, 64))
    out = proc(image)
    assert (out.rows, out.cols) == (1, 2) and out.num_tiles == 3
    assert torch.all(out.pixel_values[0] == 1.0) and torch.all(out.pixel_values[1] == -1.0)
    thumb = out.pixel_values[2]  # the whole image squashed to one tile: white left, black right
    assert thumb[:, :, :30].min() > 0.9 and thumb[:, :, 34:].max() < -0.9
    # 40 wide x 100 high: a 2x1 canvas (128 high), kept at its size since it fits.
    tall = proc(Image.new("RGB", (40, 100), (255, 255, 255)))
    assert (tall.rows, tall.cols) == (2, 1)
    first = tall.pixel_values[0]
    # Resized to 40x100 kept (fits), padded black on the right: columns >= 40 are black.
    assert torch.all(first[:, :, :40] == 1.0) and torch.all(first[:, :, 40:] == -1.0)


def test_single_tile_layout_and_generalised_token_count(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)  # the tiny preset: 16 tokens per tile
    assert proc.tokens_per_tile == 16
    ids, pixels = proc.encode(Image.new("RGB", (64, 64)), tok)
    assert pixels.shape == (1, 3, 64, 64)
    assert ids == [tok.image_start_id, tok.image_id] + [tok.patch_id] * 16 + [tok.image_end_id]


def test_multi_tile_layout(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    ids = proc.image_tokens(2, 3, tok)
    p, x, y = tok.patch_id, tok.tile_x_separator_id, tok.tile_y_separator_id
    row = [p] * 16 + [x] + [p] * 16 + [x] + [p] * 16 + [y]
    assert ids == [tok.image_start_id] + row + row + [tok.image_id] + [p] * 16 + [tok.image_end_id]
    assert len(ids) == proc.num_image_tokens(2, 3) == 3 + 16 + 6 * 17
    assert ids.count(p) == 7 * proc.tokens_per_tile  # one feature per <|patch|>, thumbnail included


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGB", "WEBP"), ("L", "PNG"), ("P", "GIF"),
                                       ("RGBA", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("I;16", "PNG"),
                                       ("CMYK", "JPEG"), ("RGBA", "WEBP")])
def test_formats_and_modes_decode_to_rgb(mode, fmt):
    image = Image.new(mode, (20, 10))
    rgb = load_image(_png(image, fmt))
    assert rgb.mode == "RGB" and rgb.size == (20, 10)


def test_transparency_composites_on_white_and_gif_uses_first_frame():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_png(clear)).getpixel((0, 0)) == (255, 255, 255)
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    data = _png(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data).getpixel((0, 0)) == (255, 0, 0)


def test_bad_images_raise_image_error_naming_the_file(tmp_path):
    good = _png(Image.new("RGB", (64, 64), (9, 9, 9)))
    cases = {
        "truncated.png": good[: len(good) // 2],
        "garbage.png": b"this is not an image",
        "empty.jpg": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageError, ValueError)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(Image.new("1", (5000, 5000))))  # tiny file, 25 megapixels
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        load_image(bomb, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="bomb"):
        ImageProcessor(max_pixels=1_000_000)(bomb)


def _transformers_tiling_functions() -> dict:
    """The canvas helpers of transformers' Llama4ImageProcessor, taken from its source file.

    The module imports torchvision, which does not install beside this torch, so the pure-torch
    helper functions are lifted out with `ast` and run on their own."""
    import ast
    import collections
    import functools
    import importlib.util
    import math
    import os
    import types

    spec = importlib.util.find_spec("transformers")
    if spec is None:
        pytest.skip("transformers not installed")
    path = os.path.join(str(spec.submodule_search_locations[0]), "models", "llama4", "image_processing_llama4.py")
    tree = ast.parse(open(path).read())
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions", "get_best_fit"}
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], [])
    namespace = dict(torch=torch, math=math, defaultdict=collections.defaultdict,
                     lru_cache=functools.lru_cache, SizeDict=types.SimpleNamespace)
    exec(compile(module, path, "exec"), namespace)
    assert wanted <= namespace.keys()
    return namespace


def test_canvas_and_resize_match_transformers_on_many_sizes():
    hf = _transformers_tiling_functions()
    tile = 336
    size = collections.namedtuple("SizeDict", "height width")(tile, tile)  # hashable, for lru_cache
    resolutions = torch.tensor(hf["find_supported_resolutions"](16, size))
    g = torch.Generator().manual_seed(0)
    sizes = [(1, 1), (336, 336), (337, 335), (800, 500), (3000, 2000), (10, 10000), (10000, 10)]
    sizes += [tuple(int(v) for v in torch.randint(1, 4000, (2,), generator=g)) for _ in range(300)]
    for h, w in sizes:
        th, tw = (int(v) for v in hf["get_best_fit"]((h, w), resolutions))
        rows, cols = choose_canvas(h, w, tile, 16)
        assert (rows * tile, cols * tile) == (th, tw), (h, w)
        target = (min(max(h, tile), th), min(max(w, tile), tw))
        want = tuple(max(v, 1) for v in hf["get_max_res_without_distortion"]((h, w), target))
        assert resized_size(h, w, rows, cols, tile) == want, (h, w)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 2), (3, 2), (4, 4), (1, 16)])
def test_token_layout_matches_transformers_processor(tok, rows, cols):
    processing = pytest.importorskip("transformers.models.llama4.processing_llama4")
    proc = ImageProcessor(tile_size=64, patch_size=8)
    # The method only formats a string; it reads nothing from `self`.
    text = processing.Llama4Processor._prompt_split_image(None, (rows, cols), proc.tokens_per_tile)
    assert tok.decode(proc.image_tokens(rows, cols, tok)) == text
