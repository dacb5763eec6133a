"""Video as sampled frames (herd.data.video), several images and a video in one chat (herd.chat),
the clips task (herd.tasks.clips), and `herd eval`'s tasks on a tiny model with a vision tower."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from herd.chat import render_chat
from herd.config import ModelConfig, TextConfig, VisionConfig
from herd.data.corpora import stdlib_texts
from herd.data.documents import Document
from herd.data.images import ImageError, ImageProcessor
from herd.data.synthetic import COLORS
from herd.data.video import frame_indices, sample_frames
from herd.eval.command import EvalConfig, run_eval
from herd.hf import save_pretrained
from herd.model import Llama4
from herd.tasks import get_task
from herd.tasks.clips import DIRECTIONS, event_clip, moving_circle
from herd.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=30_000)], num_bpe_ranks=300)


def _gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _solid(n: int) -> list[Image.Image]:
    """n frames, frame i filled with grey level 10 * i (so a sampled frame says which it was)."""
    return [Image.new("RGB", (16, 12), (10 * i,) * 3) for i in range(n)]


def test_frame_indices_are_the_centres_of_equal_spans():
    assert frame_indices(10, 4) == [1, 3, 6, 8]  # centres of [0, 2.5), [2.5, 5), ...
    assert frame_indices(8, 8) == list(range(8)) and frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(100, 1) == [50]
    with pytest.raises(ValueError, match="at least 1 frame"):
        frame_indices(5, 0)


@pytest.mark.parametrize("as_gif", [True, False])
def test_sample_frames_from_an_animation_or_a_list(as_gif):
    frames = _solid(10)
    clip = _gif(frames) if as_gif else frames
    got = sample_frames(clip, 4)
    assert [im.getpixel((0, 0))[0] for im in got] == [10 * i for i in frame_indices(10, 4)]
    assert all(im.mode == "RGB" and im.size == (16, 12) for im in got)


def test_bad_videos_say_what_is_wrong():
    with pytest.raises(ImageError, match="at least one frame"):
        sample_frames([], 4)
    with pytest.raises(ImageError, match="cannot read the video"):
        sample_frames(b"not a gif", 4)
    with pytest.raises(ImageError, match="a list of frames"):
        sample_frames(42, 4)


def test_chat_renders_several_images_and_a_video_in_order(tok):
    """A video part becomes its sampled frames, each laid out and tiled exactly as an image part."""
    proc = ImageProcessor(tile_size=32, patch_size=8, max_tiles=4)
    wide, frames = Image.new("RGB", (64, 32), (200, 0, 0)), _solid(6)
    as_video = [{"role": "user", "content": [{"type": "image", "image": wide},
                                             {"type": "video", "video": _gif(frames), "frames": 3},
                                             {"type": "text", "text": "What happens?"}]}]
    picked = [frames[i] for i in frame_indices(6, 3)]
    as_images = [{"role": "user", "content": [{"type": "image", "image": im} for im in [wide, *picked]]
                  + [{"type": "text", "text": "What happens?"}]}]
    video, images = (render_chat(m, tok, add_generation_prompt=True, image_processor=proc) for m in (as_video, as_images))
    assert video.ids == images.ids and torch.equal(video.pixel_values, images.pixel_values)
    assert video.ids.count(tok.image_start_id) == 4
    assert video.pixel_values.shape[0] == 3 + 3  # the wide image: 2 tiles + thumbnail; each frame one tile
    # the template's view without a processor: one <|image|> per image and per frame
    assert render_chat(as_video, tok).ids.count(tok.image_id) == 4


def _circle_centre(image: Image.Image, color) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((np.abs(pixels - np.array(color)).sum(-1) < 10))
    return np.array([xs.mean(), ys.mean()])


def test_clips_move_the_circle_the_way_the_answer_says():
    for index in range(12):
        frames, direction = moving_circle(index)
        assert len(frames) == 4
        colors = [c for c in COLORS.values() if (np.asarray(frames[0]) == c).all(-1).sum() > 50]
        moves = []
        for color in colors:  # the moving circle's colour: its centre moves from frame to frame
            centres = [_circle_centre(f, color) for f in frames]
            moves.append(centres[-1] - centres[0])
        step = max(moves, key=lambda m: np.abs(m).sum())
        assert np.allclose(np.sign(np.round(step)), DIRECTIONS[direction]), (index, direction, step)


def test_training_clips_show_the_event_their_caption_names():
    words = ("first", "second", "third", "fourth")
    for index in range(1, 13):
        frames, caption = event_clip(index)
        count = lambda frame, name: int((np.asarray(frame) == COLORS[name]).all(-1).sum())  # noqa: E731
        if index % 3 == 0:
            moved, direction = moving_circle(index)  # the clips task's own clip
            assert f" circle moves {direction}" in caption
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, moved))
            continue
        found = re.fullmatch(r"A (\w+) circle appears in the (\w+) frame\.", caption) if index % 3 == 1 else \
            re.fullmatch(r"A circle changes from (\w+) to (\w+) in the (\w+) frame\.", caption)
        assert found, caption
        *names, when = found.groups()
        when = words.index(when)
        for t, frame in enumerate(frames):
            shown = names[-1] if t >= when else (names[0] if len(names) == 2 else None)
            for name in COLORS:  # exactly the colour the caption says is in the frame, and no other
                assert (count(frame, name) > 50) == (name == shown), (index, caption, t, name)


def test_clips_task_problems_and_checker():
    task = get_task("clips")
    clip, pair = task.problems("test", 2)
    assert clip.level == 1 and len(clip.video) == 4 and clip.answer in DIRECTIONS
    assert pair.level == 2 and len(pair.images) == 2 and pair.answer in ("first", "second")
    for p in (clip, pair):
        assert task.check(p, p.worked).answer == 1.0 and task.check(p, "Answer: sideways").answer == 0.0
    assert task.check(pair, f"Answer: the {pair.answer} one").answer == 1.0


def test_herd_eval_scores_image_and_clip_tasks_on_a_vision_model(tok, tmp_path):
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_local_experts=2, attention_chunk_size=16, max_position_embeddings=2048,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=128, projector_input_dim=48, projector_output_dim=48, vision_output_dim=48)
    torch.manual_seed(0)
    model = Llama4(ModelConfig(text=text, vision=vision, image_token_index=tok.patch_id,
                               boi_token_index=tok.image_start_id, eoi_token_index=tok.image_end_id))
    save_pretrained(model, tmp_path / "model")
    tok.save(tmp_path / "model")
    cfg = EvalConfig(model=str(tmp_path / "model"), out=str(tmp_path / "eval"), sections=("tasks",), train_len=64,
                     tasks=("scenes", "clips"), task_problems=2, task_samples=2, task_tokens=6)
    r = run_eval(cfg)
    kinds = r["tasks"]["kinds"]
    assert set(kinds) == {"scenes", "clips"} and not r["tasks"]["skipped"]
    assert all(k["tasks"] == 2 and 0 <= k["pass@1"] <= k["pass@2"] <= 1 for k in kinds.values())
    assert "| clips | 2 | 2 |" in (tmp_path / "eval" / "report.md").read_text()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["kinds"]["clips"]["tasks"] == 2


def test_several_images_and_frames_lay_out_as_transformers_llama4_processor_does(tok, tmp_path):
    """transformers' Llama4Processor (with herd's tiling standing in for its image processor, which
    needs torchvision; tiling itself is checked in test_images) replaces the chat's `<|image|>`s with
    each image's layout in order. herd's chat of two images and a video gives the same ids, the
    video as its frames (Llama 4's processor takes no video: frames go in as images)."""
    transformers = pytest.importorskip("transformers")
    from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    herd_proc = ImageProcessor(tile_size=32, patch_size=8, max_tiles=4)

    class HerdTiling(BaseImageProcessor):
        model_input_names = ["pixel_values"]

        def __call__(self, images, **kwargs):
            done = [herd_proc(im) for im in images]
            return BatchFeature({"pixel_values": torch.cat([d.pixel_values for d in done]),
                                 "aspect_ratios": [(d.rows, d.cols) for d in done]})

    tok.save(tmp_path / "tok")
    processor = Llama4Processor(image_processor=HerdTiling(), patch_size=8,
                                tokenizer=transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"))
    wide, tall, frames = Image.new("RGB", (64, 32), (200, 0, 0)), Image.new("RGB", (20, 60), (0, 0, 200)), _solid(5)
    picked = [frames[i] for i in frame_indices(5, 2)]
    ours = render_chat([{"role": "user", "content": [
        {"type": "image", "image": wide}, {"type": "text", "text": "and"}, {"type": "image", "image": tall},
        {"type": "video", "video": frames, "frames": 2}, {"type": "text", "text": "What moved?"}]}],
        tok, add_generation_prompt=True, image_processor=herd_proc)
    as_images = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                              {"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": "What moved?"}]}]
    prompt = processor.apply_chat_template(as_images, add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[prompt], images=[wide, tall, *picked], add_special_tokens=False)
    assert ours.ids == list(theirs["input_ids"][0])
    assert torch.equal(ours.pixel_values, torch.as_tensor(theirs["pixel_values"]))
    assert ours.ids.count(tok.image_start_id) == 4


def _clip_run(tok, tmp_path, clips: int):
    """A Run of the smoke preset whose joint stage mixes `clips` captioned clips into its caption rows
    (no model is run: the stage's loader is what is tested, so the model is only its config)."""
    import dataclasses
    from types import SimpleNamespace

    from herd.presets import tiny
    from herd.train.config import smoke
    from herd.train.recipes import Run

    cfg = dataclasses.replace(smoke(), images=4, clips=clips)
    return Run(cfg, tmp_path, tok, SimpleNamespace(config=tiny()), [], [], 1.0)


def test_joint_stage_trains_on_clip_captions_with_all_their_frames(tok, tmp_path):
    from herd.model.head_loss import IGNORE
    from herd.train.recipes import joint

    run = _clip_run(tok, tmp_path, clips=6)
    run.train_docs = [Document.from_ids(tok.encode("x = 1\n" * 40, bos=True, eos=True), tok)]
    captions = joint(run).data.loaders[1]  # the joint stage's image-caption rows
    per_tile = run.image_processor.tokens_per_tile
    clip_tiles = {tuple(d.pixels().flatten()[::97].tolist()): d for d in run.clips}
    seen, kinds = 0, set()
    for _ in range(captions.batches_per_epoch()):
        batch = next(captions)
        tiles_before = 0
        for row in range(batch.input_ids.shape[0]):
            ids, labels, docs = batch.input_ids[row], batch.labels[row], batch.document_ids[row]
            for d in docs.unique().tolist():
                if d < 0:
                    continue
                where = (docs == d).nonzero().flatten()
                doc_ids, doc_labels = ids[where], labels[where]
                tiles = int((doc_ids == tok.patch_id).sum()) // per_tile
                if int((doc_ids == tok.image_start_id).sum()) == 4:  # a clip: 4 frames, then its caption
                    targets = doc_labels[doc_labels != IGNORE].tolist()
                    caption = tok.decode(targets[:-1])
                    assert targets[-1] == tok.end_of_text_id
                    assert re.fullmatch(r"A (\w+ )?circle (moves|appears|changes) .*\.", caption), caption
                    kinds.add(caption.split(" circle ")[1].split(" ")[0])
                    last_frame_end = int((doc_ids == tok.image_end_id).nonzero().max())
                    assert (doc_labels[:last_frame_end] == IGNORE).all()  # no frame id is a target
                    pixels = batch.pixel_values[tiles_before:tiles_before + tiles]
                    assert pixels.shape[0] == 4
                    doc = clip_tiles[tuple(pixels.flatten()[::97].tolist())]  # the tiles are this clip's frames
                    assert torch.equal(pixels, doc.pixels()) and not torch.equal(pixels[0], pixels[-1])
                    seen += 1
                tiles_before += tiles
        assert tiles_before == batch.pixel_values.shape[0]
    assert seen == 6 and kinds == {"moves", "appears", "changes"}  # every clip once an epoch, each kind of event
    assert max(len(d) for d in run.clips) <= run.cfg.train.seq_len  # a clip fits a row


def test_clip_documents_never_hold_a_held_out_clip(tok):
    from herd.tasks.base import in_split
    from herd.tasks.clips import ClipQuestions, clip_documents, clip_key

    docs = clip_documents(tok, ImageProcessor(tile_size=64, patch_size=8, max_tiles=1), 40)
    trained = [d.pixel_values.index for d in docs]
    skipped = set(range(max(trained) + 1)) - set(trained)
    assert skipped and all(not in_split(clip_key(i), "train", ClipQuestions.test_fraction) for i in skipped)
    held_out = {p.key for p in ClipQuestions().problems("test", 50, level=1)}
    assert held_out.isdisjoint(clip_key(i) for i in trained)
