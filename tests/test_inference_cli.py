"""`herd generate` and `herd chat` on a tiny multimodal checkpoint with its own tokenizer."""

import io

import pytest
import torch
from PIL import Image

import herd
from herd.cli import main
from herd.config import ModelConfig, TextConfig, VisionConfig
from herd.data.corpora import stdlib_texts
from herd.inference.chat_cmd import chat_loop
from herd.inference.compiled import compiled_step
from herd.inference.session import ChatSession, Sampling, TextStream, load_model_and_tokenizer
from herd.model import Llama4
from herd.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=100_000)], num_bpe_ranks=300)
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_local_experts=2, attention_chunk_size=16, max_position_embeddings=2048,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=128, projector_input_dim=48, projector_output_dim=48, vision_output_dim=48)
    config = ModelConfig(text=text, vision=vision, image_token_index=tok.patch_id,
                         boi_token_index=tok.image_start_id, eoi_token_index=tok.image_end_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    herd.save_pretrained(Llama4(config), path)
    tok.save(path)
    image = path / "cat.png"
    Image.new("RGB", (40, 24), (200, 120, 30)).save(image)
    (path / "broken.png").write_bytes(b"\x89PNG not really")
    return path


def test_generate_command_streams_text(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()  # some text came out
    assert main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "x = ", "--max-new-tokens", "3",
                 "--quantize", "int4", "--chat", "--image", str(checkpoint / "cat.png")]) == 0


def test_generate_command_compiled_gives_the_same_text(checkpoint, capsys, monkeypatch):
    from herd.inference import batching

    steps = []
    monkeypatch.setattr(batching, "compiled_step", lambda *a: steps.append(1) or compiled_step(*a))
    args = ["generate", "--model", str(checkpoint), "--prompt", "import os", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == eager and steps  # the decode steps did run compiled


def test_a_model_loaded_for_inference_is_prepared_for_decoding(checkpoint):
    from herd.inference.fast import FastAttention

    model, _ = load_model_and_tokenizer(checkpoint, quantize="int8")
    assert model.decode_ready and isinstance(model.layers[0].self_attn, FastAttention)


def test_text_stream_holds_back_partial_characters(checkpoint):
    _, tok = load_model_and_tokenizer(checkpoint)
    out = []
    stream = TextStream(tok, out.append)
    ids = tok.encode("héllo ✓")
    assert tok.decode(ids[:2]).endswith("\ufffd")  # the tokenizer does split a character
    for i in ids:
        stream.add(i)
    assert "".join(out) == "héllo ✓" and all("\ufffd" not in piece for piece in out)


def test_chat_session_survives_bad_input_and_interrupts(checkpoint):
    model, tok = load_model_and_tokenizer(checkpoint)
    session = ChatSession(model, tok, Sampling(max_new_tokens=8, temperature=0.0), system="Be brief.")
    lines = iter(["hello there", f"/image {checkpoint / 'broken.png'}", "/image /no/such/file.png", "/wat",
                  f"/image {checkpoint / 'cat.png'}", "what is in the picture?", "interrupt me", "/quit", "never read"])
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
