import json

import pytest

from herd.data.corpora import (BadInputError, ChatDoc, ImageTextDoc, TextDoc, read_user_data, read_user_texts,
                               stable_fraction, stdlib_files, stdlib_root, stdlib_texts)


def test_stdlib_split_is_disjoint_stable_and_mostly_train():
    train, val = stdlib_files("train"), stdlib_files("validation")
    assert not set(train) & set(val)
    assert len(train) > 500 and 0.02 < len(val) / (len(train) + len(val)) < 0.09
    assert all("site-packages" not in p.parts for p in train + val)
    assert train == sorted(train, key=lambda p: p.relative_to(stdlib_root()).as_posix())
    # The split depends on the relative path only (sha256, not Python's salted hash).
    assert stable_fraction("json/decoder.py") == stable_fraction("json/decoder.py")
    assert stable_fraction("a.py") != stable_fraction("b.py")
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")


def test_stdlib_texts_are_python_source():
    docs = list(stdlib_texts("validation", max_files=5))
    assert docs and all(isinstance(d, TextDoc) and d.text.strip() for d in docs)
    assert sum("def " in d.text or "import " in d.text for d in docs) >= 3
    capped = list(stdlib_texts("train", max_bytes=50_000))
    assert sum(len(d.text.encode()) for d in capped[:-1]) < 50_000


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "code.py").write_text("print('hi')\n")
    (tmp_path / "cat.png").write_bytes(b"not read directly")
    lines = [
        {"text": "a jsonl document"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"image": "cat.png", "text": "a cat"},
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return tmp_path


def test_user_folder_yields_every_kind_in_sorted_order(data_dir):
    records = list(read_user_data(data_dir))
    kinds = [type(r).__name__ for r in records]
    # cat.png is skipped (images are read through JSONL), then files in sorted path order.
    assert kinds == ["TextDoc", "ChatDoc", "ImageTextDoc", "TextDoc", "TextDoc"]
    image = next(r for r in records if isinstance(r, ImageTextDoc))
    assert image.image == data_dir / "cat.png" and image.source.endswith("mixed.jsonl:3")
    chat = next(r for r in records if isinstance(r, ChatDoc))
    assert chat.messages[1]["content"] == "hello"
    assert [d.text for d in read_user_texts(data_dir)] == ["a jsonl document", "plain text file\n", "print('hi')\n"]


BAD_LINES = [
    ("{not json", "mixed.jsonl:2: not valid JSON"),
    ('{"txt": "typo"}', "mixed.jsonl:2: expected a string field 'text'"),
    ('{"text": 5}', "mixed.jsonl:2: expected a string field 'text'"),
    ('[1, 2]', "mixed.jsonl:2: expected a JSON object"),
    ('{"messages": [{"content": "no role"}]}', r"mixed.jsonl:2: messages\[0\] must be an object"),
    ('{"image": "x.png"}', "mixed.jsonl:2: an image-text record needs"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "good"}\n' + line + '\n{"text": "also good"}\n')
    with pytest.raises(BadInputError, match=message):
        list(read_user_data(path, on_error="stop"))
    kept = list(read_user_data(path, on_error="skip"))
    assert [d.text for d in kept] == ["good", "also good"]
    err = capsys.readouterr().err
    assert "skipped 1 bad input" in err and "mixed.jsonl:2" in err


def test_non_utf8_and_unreadable_files(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("fine\n")
    (tmp_path / "b.txt").write_bytes(b"line one\nline two \xff\xfe broken\n")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInputError, match=r"b.txt:2: not UTF-8 text"):
        list(read_user_data(tmp_path))
    texts = [d.text for d in read_user_data(tmp_path, on_error="skip")]
    assert texts == ["fine\n"]  # a file that is not UTF-8 is skipped whole
    assert "skipped 2 bad input" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_user_data(tmp_path / "missing"))
    with pytest.raises(ValueError, match="on_error"):
        list(read_user_data(tmp_path, on_error="ignore"))


def test_unreadable_file_is_reported(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(BadInputError, match="dangling.txt: cannot read file"):
        list(read_user_data(tmp_path))
    assert [d.text for d in read_user_data(tmp_path, on_error="skip")] == ["fine"]
    assert "dangling.txt: cannot read file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Synthetic scenes (the embedded image-text corpus)
# --------------------------------------------------------------------------------------------

from herd.data.synthetic import (BACKGROUND, COLORS, SHAPES, answer_is_correct, make_scene,  # noqa: E402
                                 scene_concepts, synthetic_scenes)


def test_scenes_are_deterministic_and_addressable_by_index():
    a = [s.caption for s in synthetic_scenes(5, seed=1, start=10)]
    b = [make_scene(i, seed=1).caption() for i in range(10, 15)]
    assert a == b
    assert [s.caption for s in synthetic_scenes(5, seed=2, start=10)] != a
    first, again = next(synthetic_scenes(1, seed=4)), next(synthetic_scenes(1, seed=4))
    assert first.image.tobytes() == again.image.tobytes() and first.qa == again.qa


def test_images_show_what_the_captions_say():
    size = 96
    for sample in synthetic_scenes(30, seed=0, image_size=size):
        pixels = sample.image.load()
        cell = size // 3
        for row in range(3):
            for col in range(3):
                colours = {pixels[x, y] for x in range(col * cell, (col + 1) * cell)
                           for y in range(row * cell, (row + 1) * cell)}
                objs = [o for o in sample.scene.objects if (o.row, o.col) == (row, col)]
                if objs:
                    assert COLORS[objs[0].color] in colours and objs[0].place in sample.caption
                else:
                    assert colours == {BACKGROUND}  # empty cells stay background
        assert sample.image.size == (size, size)


def test_answers_follow_from_the_scene_and_are_checkable():
    for sample in synthetic_scenes(50, seed=0):
        objects = sample.scene.objects
        answers = dict(sample.qa)
        assert answers["How many shapes are there?"] == str(len(objects))
        for question, answer in sample.qa:
            if question.startswith("Is there a "):
                colour, shape = question[len("Is there a "):-1].split()
                assert (answer == "yes") == any(o.color == colour and o.shape == shape for o in objects)
            if question.startswith("How many ") and question.endswith("s are there?") and "shapes" not in question:
                shape = question[len("How many "):-len("s are there?")]
                assert shape in SHAPES and answer == str(sum(o.shape == shape for o in objects))
    assert answer_is_correct(" Three.", "3") and answer_is_correct("Red", "red")
    assert not answer_is_correct("2", "3")
    assert len(scene_concepts()) == 12
    chat = next(synthetic_scenes(1)).chat(0)
    assert chat[0]["content"][0]["type"] == "image" and chat[1]["role"] == "assistant"
    with pytest.raises(ValueError, match="max_objects"):
        make_scene(0, max_objects=10)
