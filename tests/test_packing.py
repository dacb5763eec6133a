from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from herd.chat import render_chat
from herd.data.corpora import stdlib_texts
from herd.data.documents import Document, chat_document, image_text_document, text_document
from herd.data.images import ImageProcessor
from herd.data.packing import IGNORE, Batch, Mixture, PackedLoader, pack_rows
from herd.data.synthetic import synthetic_scenes

PAD = 10**6


def _numbered_docs(lengths) -> list[Document]:
    """Document d holds ids d*1000 + j, so every token of the corpus is distinguishable."""
    return [Document(np.arange(n, dtype=np.int64) + 1000 * d, np.ones(n, dtype=bool))
            for d, n in enumerate(lengths)]


LENGTHS = [5, 40, 1, 17, 100, 3, 64, 33, 9, 70, 2, 31]


def _epoch(loader) -> list:
    return list(islice(iter(loader), loader.batches_per_epoch()))


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_token_is_an_input_exactly_once_per_epoch(world_size):
    docs = _numbered_docs(LENGTHS)
    seen = Counter()
    steps = set()
    for rank in range(world_size):
        loader = PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=3, rank=rank, world_size=world_size)
        batches = _epoch(loader)
        steps.add(len(batches))
        for b in batches:
            assert b.input_ids.shape == (2, 16)
            seen.update(t for t in b.input_ids.flatten().tolist() if t != PAD)
    assert len(steps) == 1  # every rank runs the same number of steps
    expected = Counter(int(t) for d in docs for t in d.tokens)
    assert seen == expected and max(seen.values()) == 1


def test_targets_positions_and_document_ids():
    docs = _numbered_docs(LENGTHS)
    loader = PackedLoader(docs, seq_len=16, batch_size=4, pad_id=PAD, seed=0)
    for b in _epoch(loader):
        for r in range(4):
            ids, tgt = b.input_ids[r].tolist(), b.labels[r].tolist()
            pos, doc = b.position_ids[r].tolist(), b.document_ids[r].tolist()
            for i, t in enumerate(ids):
                if t == PAD:
                    assert tgt[i] == IGNORE and doc[i] == -1
                    continue
                d, j = divmod(t, 1000)
                last = j == LENGTHS[d] - 1
                # The next id of the same document, even when it starts the next row.
                assert tgt[i] == (IGNORE if last else t + 1)
                first_of_piece = i == 0 or doc[i - 1] != doc[i]
                assert pos[i] == (0 if first_of_piece else pos[i - 1] + 1)
                if not first_of_piece:
                    assert ids[i - 1] == t - 1  # a piece is one contiguous run of one document


def test_packing_fills_rows_and_splits_long_documents():
    docs = _numbered_docs([10, 10, 30])
    rows = pack_rows(docs, [0, 1, 2], seq_len=16)
    assert [[(p.doc, p.start, p.end) for p in row] for row in rows] == [
        [(0, 0, 10), (1, 0, 6)], [(1, 6, 10), (2, 0, 12)], [(2, 12, 28)], [(2, 28, 30)]]


def test_deterministic_for_a_seed_and_different_across_seeds():
    docs = _numbered_docs(LENGTHS)
    a = _epoch(PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=1))
    b = _epoch(PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=1))
    c = _epoch(PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=2))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    # A new epoch is a new shuffle.
    loader = PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=1)
    n = loader.batches_per_epoch()
    both = list(islice(iter(loader), 2 * n))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(both[:n], both[n:]))


@pytest.mark.parametrize("stop_after", [0, 3, 7, 12])  # mid-epoch, and across the epoch boundary
def test_resume_gives_the_same_next_batches(stop_after):
    docs = _numbered_docs(LENGTHS)
    make = lambda: PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=5, rank=1, world_size=2)  # noqa: E731
    reference = list(islice(iter(make()), stop_after + 3))
    first = make()
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    again = list(islice(iter(resumed), 3))
    for x, y in zip(reference[stop_after:], again):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_global_batch_is_the_same_for_any_number_of_ranks(world_size):
    """N ranks of B rows see together exactly the rows one process of N * B rows sees, batch by
    batch, and batch k is a pure function of (epoch, k): what resuming and data parallelism need."""
    docs = _numbered_docs(LENGTHS)
    one = PackedLoader(docs, seq_len=16, batch_size=2 * world_size, pad_id=PAD, seed=4)
    ranks = [PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, seed=4, rank=r, world_size=world_size)
             for r in range(world_size)]
    for k, whole in enumerate(_epoch(one)):
        parts = Batch.stack([next(r) for r in ranks])
        for name in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(getattr(whole, name), getattr(parts, name)), (k, name)
        assert torch.equal(one.batch_at(0, k).input_ids, whole.input_ids)


def test_whole_documents_are_not_split_unless_longer_than_a_row():
    docs = _numbered_docs([5, 7, 4, 9, 20, 3])
    for row in pack_rows(docs, range(len(docs)), 10, whole_documents=True):
        for piece in row:
            n = len(docs[piece.doc])
            assert (piece.start, piece.end) == (0, n) or n > 10
    split = pack_rows(docs, range(len(docs)), 10)
    assert any(p.end - p.start < len(docs[p.doc]) <= 10 for row in split for p in row)  # the default splits


def test_a_mixture_stacks_its_loaders_rows_and_resumes():
    code = _numbered_docs([30, 20, 25])
    other = [Document(np.arange(6) + 50_000 + 1000 * d, np.ones(6, dtype=bool)) for d in range(3)]
    make = lambda: Mixture(PackedLoader(code, seq_len=16, batch_size=3, pad_id=PAD, seed=0),  # noqa: E731
                           PackedLoader(other, seq_len=16, batch_size=1, pad_id=PAD, seed=0, whole_documents=True))
    reference = list(islice(make(), 6))
    assert reference[0].input_ids.shape == (4, 16)
    code_rows, other_row = reference[0].input_ids[:3], reference[0].input_ids[3]
    assert ((code_rows < 50_000) | (code_rows == PAD)).all() and (other_row >= 50_000).all()
    first = make()
    list(islice(first, 4))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(reference[4:], islice(resumed, 2)):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)


def test_state_from_another_layout_is_refused():
    docs = _numbered_docs(LENGTHS)
    state = PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        PackedLoader(docs, seq_len=16, batch_size=2, pad_id=PAD).load_state_dict(state)


def test_num_epochs_stops_and_bad_arguments():
    docs = _numbered_docs([8, 8])
    assert len(list(PackedLoader(docs, seq_len=8, batch_size=1, pad_id=PAD, num_epochs=2, shuffle=False))) == 4
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(docs, seq_len=8, batch_size=1, pad_id=PAD, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one document"):
        PackedLoader([], seq_len=8, batch_size=1, pad_id=PAD)


def test_images_are_never_split_and_tiles_follow_patch_order(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)  # 16 tokens per tile
    docs = [text_document("x = 1\n" * 5, tok)]
    for sample in synthetic_scenes(6, seed=0):
        docs.append(image_text_document(sample.image, sample.caption, tok, proc))
    wide = Image.new("RGB", (128, 64), "white")  # 1x2 tiles + thumbnail: 3 tiles, 3 + 16 + 2*17 tokens
    docs.append(image_text_document(wide, "wide", tok, proc))
    assert docs[-1].image_spans[0].num_tiles == 3
    loader = PackedLoader(docs, seq_len=64, batch_size=2, pad_id=tok.pad_id, seed=0)
    total_tiles = 0
    for b in _epoch(loader):
        ids = b.input_ids
        n_patches = int((ids == tok.patch_id).sum())
        n_tiles = 0 if b.pixel_values is None else b.pixel_values.shape[0]
        assert n_patches == n_tiles * proc.tokens_per_tile  # early fusion needs an exact match
        total_tiles += n_tiles
        # Every image in a row is whole: as many starts as ends, each start before its end.
        for row in ids:
            starts = (row == tok.image_start_id).nonzero().flatten().tolist()
            ends = (row == tok.image_end_id).nonzero().flatten().tolist()
            assert len(starts) == len(ends) and all(s < e for s, e in zip(starts, ends))
        # Layout ids are never targets.
        layout = torch.tensor(sorted(tok.image_layout_ids))
        assert not torch.isin(b.labels, layout).any()
    assert total_tiles == 6 + 3
    with pytest.raises(ValueError, match="does not fit in seq_len=32"):
        PackedLoader(docs, seq_len=32, batch_size=2, pad_id=tok.pad_id).batches_per_epoch()


def test_tiles_arrive_in_the_order_of_their_images(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    colours = ["red", "green", "blue"]
    docs = [image_text_document(Image.new("RGB", (64, 64), c), c, tok, proc) for c in colours]
    loader = PackedLoader(docs, seq_len=128, batch_size=1, pad_id=tok.pad_id, shuffle=False)
    batch = next(iter(loader))
    assert batch.pixel_values.shape == (3, 3, 64, 64)
    means = batch.pixel_values.mean(dim=(2, 3))  # [tile, channel]
    assert means.argmax(dim=1).tolist() == [0, 1, 2]  # red, green, blue: the documents' order


def test_chat_documents_train_only_on_the_assistant(tok):
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    rendered = render_chat(messages, tok)
    doc = chat_document(rendered, tok)
    loader = PackedLoader([doc], seq_len=len(doc), batch_size=1, pad_id=tok.pad_id, shuffle=False)
    batch = next(iter(loader))
    trained = [t for t in batch.labels[0].tolist() if t != IGNORE]
    assert tok.decode(trained) == "hi<|eot|>"


def test_document_validation(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    ids, pixels = proc.encode(Image.new("RGB", (64, 64)), tok)
    with pytest.raises(ValueError, match="tokens_per_tile"):
        Document.from_ids(ids, tok, pixel_values=pixels)
    with pytest.raises(ValueError, match="describe 1 tiles but pixel_values has 2"):
        Document.from_ids(ids, tok, tokens_per_tile=16, pixel_values=torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="no pixel_values"):
        Document.from_ids(ids, tok, tokens_per_tile=16)
    with pytest.raises(ValueError, match="unbalanced"):
        Document.from_ids(ids[:-1], tok, tokens_per_tile=16, pixel_values=pixels)
    lazy = Document.from_ids(ids, tok, tokens_per_tile=16, pixel_values=lambda: pixels, num_tiles=1)
    assert lazy.pixels() is pixels


# --------------------------------------------------------------------------------------------
# Whole corpora as documents (herd.data.datasets)
# --------------------------------------------------------------------------------------------

from herd.data.corpora import BadInputError  # noqa: E402
from herd.data.datasets import scene_documents, stdlib_documents, user_documents  # noqa: E402


def test_stdlib_documents_round_trip(tok):
    docs = stdlib_documents(tok, "validation", max_files=3)
    texts = [d.text for d in stdlib_texts("validation", max_files=3)]
    assert len(docs) == len(texts)
    for doc, text in zip(docs, texts):
        assert doc.tokens[0] == tok.bos_id and doc.tokens[-1] == tok.end_of_text_id
        assert tok.decode(doc.tokens[1:-1].tolist()) == text


def test_scene_documents_feed_the_loader(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    captions = scene_documents(tok, proc, 4, kind="caption", seed=0)
    qa = scene_documents(tok, proc, 2, kind="qa", seed=0)
    # Pixels are lazy, and reproduce exactly what the processor makes of the drawn scene.
    sample = next(synthetic_scenes(1, seed=0))
    assert torch.equal(captions[0].pixels(), proc(sample.image).pixel_values)
    trained = tok.decode([t for t, m in zip(qa[0].tokens.tolist(), qa[0].target_mask) if m])
    assert trained == "".join(a + "<|eot|>" for _, a in sample.qa)  # only the answers are targets
    loader = PackedLoader(captions + qa, seq_len=256, batch_size=2, pad_id=tok.pad_id, seed=0)
    batches = _epoch(loader)
    tiles = sum(b.pixel_values.shape[0] for b in batches if b.pixel_values is not None)
    assert tiles == 6
    with pytest.raises(ValueError, match="kind"):
        scene_documents(tok, proc, 1, kind="video")


def test_user_documents_with_images_and_bad_records(tok, tmp_path, capsys):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "red.png", "text": "a red square"}\n'
        '{"image": "broken.png", "text": "oops"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "robot", "content": "beep"}]}\n'
        '{"text": "plain"}\n')
    with pytest.raises(BadInputError, match=r"data.jsonl:2: .*broken.png"):
        user_documents(tmp_path, tok, proc)
    docs = user_documents(tmp_path, tok, proc, on_error="skip")
    assert len(docs) == 3
    assert "skipped 2 bad input" in capsys.readouterr().err
    assert float(docs[0].pixels()[0, 0].mean()) == pytest.approx(1.0)  # red channel, re-read from disk


def test_batches_run_through_the_tiny_model(tok):
    """Integration: a packed batch with images is what herd's Llama 4 consumes (counts, shapes)."""
    import dataclasses

    model_module = pytest.importorskip("herd.model.llama4")
    from herd.presets import tiny

    cfg = tiny()
    text = dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                               eos_token_id=tok.end_of_text_id, pad_token_id=tok.pad_id)
    cfg = dataclasses.replace(cfg, text=text, image_token_index=tok.patch_id,
                              boi_token_index=tok.image_start_id, eoi_token_index=tok.image_end_id)
    proc = ImageProcessor.from_config(cfg.vision)
    docs = scene_documents(tok, proc, 3, kind="qa") + [text_document("print('hello')\n" * 20, tok)]
    batch = next(iter(PackedLoader(docs, seq_len=128, batch_size=2, pad_id=tok.pad_id, seed=0)))
    assert batch.pixel_values is not None
    torch.manual_seed(0)
    model = model_module.Llama4(cfg)
    out = model(batch.input_ids, pixel_values=batch.pixel_values, document_ids=batch.document_ids,
                position_ids=batch.position_ids)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(),
                                             ignore_index=IGNORE)
    assert out.logits.shape == (2, 128, tok.vocab_size) and torch.isfinite(loss)


def test_a_batch_without_images_can_still_run_the_vision_tower(tok):
    """With `tile_shape`, a batch that holds no image carries empty pixel_values, which the model
    takes as no image at all: the same logits, and zero (not missing) vision gradients, so every
    data-parallel rank runs the same FSDP2 collectives whether or not its rows hold an image."""
    import dataclasses

    from herd.model import Llama4
    from herd.presets import tiny

    cfg = tiny()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size),
                              image_token_index=tok.patch_id)
    docs = [text_document("print('hello')\n" * 20, tok)]
    plain = next(PackedLoader(docs, seq_len=64, batch_size=2, pad_id=tok.pad_id, seed=0))
    with_tiles = next(PackedLoader(docs, seq_len=64, batch_size=2, pad_id=tok.pad_id, seed=0,
                                   tile_shape=(3, 64, 64)))
    assert plain.pixel_values is None and with_tiles.pixel_values.shape == (0, 3, 64, 64)
    torch.manual_seed(0)
    model = Llama4(cfg)
    out = model(with_tiles.input_ids, pixel_values=with_tiles.pixel_values, targets=with_tiles.labels)
    torch.testing.assert_close(out.loss_sum, model(plain.input_ids, targets=plain.labels).loss_sum)
    out.loss_sum.backward()
    vision_grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and not g.any() for g in vision_grads)
