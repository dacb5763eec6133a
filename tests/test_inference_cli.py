"""`herd generate` and `herd chat` on a tiny multimodal checkpoint (tests/tiny.py) with its own tokenizer."""

import io

import pytest
from PIL import Image

from herd.cli import main
from herd.inference.chat_cmd import chat_loop
from herd.inference.compiled import compiled_step
from herd.inference.session import ChatSession, Sampling, TextStream, load_model_and_tokenizer


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image and a broken one."""
    images = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 24), (200, 120, 30)).save(images / "cat.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    return images


def test_generate_command_streams_text(tiny_checkpoint, images, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()  # some text came out
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x = ", "--max-new-tokens", "3",
                 "--quantize", "int4", "--chat", "--image", str(images / "cat.png")]) == 0


def test_generate_command_compiled_gives_the_same_text(tiny_checkpoint, capsys, monkeypatch):
    from herd.inference import batching

    steps = []
    monkeypatch.setattr(batching, "compiled_step", lambda *a: steps.append(1) or compiled_step(*a))
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "import os", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == eager and steps  # the decode steps did run compiled


def test_a_model_loaded_for_inference_is_prepared_for_decoding(tiny_checkpoint):
    from herd.inference.fast import FastAttention

    model, _ = load_model_and_tokenizer(tiny_checkpoint, quantize="int8")
    assert model.decode_ready and isinstance(model.layers[0].self_attn, FastAttention)


def test_text_stream_holds_back_partial_characters(tiny_checkpoint):
    _, tok = load_model_and_tokenizer(tiny_checkpoint)
    out = []
    stream = TextStream(tok, out.append)
    ids = tok.encode("héllo ✓")
    assert tok.decode(ids[:2]).endswith("\ufffd")  # the tokenizer does split a character
    for i in ids:
        stream.add(i)
    assert "".join(out) == "héllo ✓" and all("\ufffd" not in piece for piece in out)


def test_chat_session_survives_bad_input_and_interrupts(tiny_checkpoint, images):
    model, tok = load_model_and_tokenizer(tiny_checkpoint)
    session = ChatSession(model, tok, Sampling(max_new_tokens=8, temperature=0.0), system="Be brief.")
    lines = iter(["hello there", f"/image {images / 'broken.png'}", "/image /no/such/file.png", "/wat",
                  f"/image {images / 'cat.png'}", "what is in the picture?", "interrupt me", "/quit", "never read"])
    out = io.StringIO()
    interrupted = {"armed": False, "times": 0}

    def write(s):
        if interrupted["armed"] and s and not s.startswith("\n"):
            interrupted["armed"] = False
            interrupted["times"] += 1
            raise KeyboardInterrupt  # Ctrl-C while the reply streams
        out.write(s)

    def read(prompt):
        line = next(lines)
        interrupted["armed"] = line == "interrupt me"
        return line

    chat_loop(session, read=read, write=write)
    log = out.getvalue()
    assert interrupted["times"] == 1
    assert log.count("(error:") == 3  # the malformed image, the missing file, the unknown command
    assert "(image attached:" in log
    roles = [m["role"] for m in session.messages]
    assert roles == ["system"] + ["user", "assistant"] * 3  # every turn kept, the interrupted one too
    image_turn = session.messages[3]["content"]
    assert image_turn[0]["type"] == "image" and image_turn[-1]["text"] == "what is in the picture?"
    assert next(lines) == "never read"  # /quit ended the loop
    session.reset()
    assert [m["role"] for m in session.messages] == ["system"]
