"""Chat data: task conversations and code instructions rendered so that only the assistant's
tokens (and the <|eot|> that ends them) are targets, TRL's JSONL formats, and the bad-record policy."""

import ast
import json
import math

import pytest
import torch
from PIL import Image

from herd.chat import render_chat
from herd.config import ModelConfig, TextConfig
from herd.data.chat_data import (chat_documents, code_instructions, preference_pairs, split_records,
                                 supervised_text, task_conversations, user_chat_data)
from herd.data.corpora import BadInputError, ChatDoc, PreferenceDoc, read_user_data
from herd.data.images import ImageProcessor
from herd.model import Llama4
from herd.tasks import get_task
from herd.train.losses import IGNORE
from herd.train.post_losses import DPOLoss, PreferenceBatch, answer_rows


@pytest.mark.parametrize("task", ["letters", "arithmetic", "scenes"])
def test_task_conversations_supervise_exactly_the_worked_answer_and_eot(tok, task):
    problems = get_task(task).problems("train", 4)
    processor = ImageProcessor(tile_size=64, patch_size=8, max_tiles=1) if task == "scenes" else None
    chats = task_conversations(problems)
    docs = chat_documents(chats, tok, processor)
    for problem, chat, doc in zip(problems, chats, docs):
        rendered = render_chat(chat.messages, tok, image_processor=processor)
        assert supervised_text(rendered, tok) == problem.worked + "<|eot|>"
        assert doc.target_mask.tolist() == rendered.loss_mask  # the packed document keeps the renderer's mask
        if processor is not None:
            assert rendered.pixel_values.shape[0] == 1
            assert not any(m for t, m in zip(rendered.ids, rendered.loss_mask) if t == tok.patch_id)


def test_padded_rows_learn_to_stop_and_never_learn_padding(tok):
    chats = task_conversations(get_task("arithmetic").problems("train", 3))
    rendered = [render_chat(c.messages, tok) for c in chats]
    batch = answer_rows(rendered, tok.pad_id)
    assert tok.pad_id != tok.eot_id  # pad is never the stop token
    for i, r in enumerate(rendered):
        targets = batch.labels[i][batch.labels[i] != IGNORE].tolist()
        assert tok.decode(targets) == supervised_text(r, tok)  # exactly the assistant's tokens...
        assert targets[-1] == tok.eot_id  # ...ending with the stop
        assert batch.attention_mask[i].sum() == len(r)
    assert tok.pad_id not in batch.labels.tolist()[0] + batch.labels.tolist()[1] + batch.labels.tolist()[2]


def test_code_instructions_ask_with_signature_and_docstring_and_answer_with_the_body():
    chats = list(code_instructions("train", max_items=8))
    assert len(chats) == 8 and all(isinstance(c, ChatDoc) and ".py:" in c.source for c in chats)
    assert list(code_instructions("train", max_items=0)) == []  # --sft_code=0: none
    for chat in chats:
        request, answer = chat.messages[0]["content"], chat.messages[1]["content"]
        header = answer.split(":\n", 1)[0]
        assert request.startswith(("Write this Python function:\n\ndef ", "Write this Python function:\n\nasync def "))
        assert header in request and '"""' in request
        tree = ast.parse(answer)  # the answer is a whole function, docstring left out
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(tree.body[0]) is None
    held_out = next(code_instructions("validation", max_items=1))
    assert held_out.source not in {c.source for c in chats}


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_trl_formats_are_read_as_chats_and_pairs(tmp_path):
    Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "red.png")
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "3+3?"}],
         "completion": [{"role": "assistant", "content": "6"}]},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": "red.png"},
                                                 {"type": "text", "text": "Colour?"}]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
    ])
    chats, prefs = split_records(read_user_data(path))
    assert [c.messages[-1]["content"] for c in chats] == ["hello", "4", "6"]
    assert chats[1].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert len(prefs) == 2 and all(isinstance(p, PreferenceDoc) for p in prefs)
    assert prefs[0].chosen == [{"role": "assistant", "content": "hi"}] and prefs[1].source.endswith("data.jsonl:5")
    assert prefs[1].prompt[0]["content"][0]["image"] == str(tmp_path / "red.png")  # resolved next to the file


BAD_RECORDS = [
    ({"messages": [{"content": "no role"}]}, r"messages\[0\] must be an object with 'role'"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\].role 'wizard' is not one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"messages\[1\] \(assistant\) has empty content"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]}]},
     r"content\[0\]: .*broken.png: not a recognised image"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}]}, "cannot open image"),
    ({"prompt": "hi", "chosen": "a"}, "'rejected' is missing"),
    ({"chosen": "a", "rejected": "b"}, "needs its 'prompt'"),
    ({"prompt": "hi", "completion": [{"role": "user", "content": "x"}]}, "'completion' has no assistant message"),
    ({"prompt": "", "completion": "x"}, r"prompt\[0\] \(user\) has empty content"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS)
def test_bad_records_stop_with_file_and_line_or_are_counted_and_skipped(tmp_path, capsys, record, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    good = {"prompt": "q", "completion": "a"}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, record, good])
    with pytest.raises(BadInputError, match="chats.jsonl:2: .*" + message):
        list(read_user_data(path, on_error="stop"))
    assert len(list(read_user_data(path, on_error="skip"))) == 2
    err = capsys.readouterr().err
    assert "skipped 1 bad input" in err and "chats.jsonl:2" in err


def test_over_long_records_are_counted_or_rejected(tok, tmp_path, capsys):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "completion": "short"},
                                                 {"prompt": "q", "completion": "word " * 200},
                                                 {"prompt": "q", "chosen": "ok", "rejected": "word " * 200}])
    chats, prefs = split_records(read_user_data(path))
    with pytest.raises(BadInputError, match=r"long.jsonl:2: over-long: \d+ tokens, more than max_tokens=64"):
        chat_documents(chats, tok, max_tokens=64)
    assert len(chat_documents(chats, tok, max_tokens=64, on_error="skip")) == 1
    assert preference_pairs(prefs, tok, max_tokens=64, on_error="skip") == []
    err = capsys.readouterr().err
    assert "long.jsonl:2: over-long" in err and "long.jsonl:3: over-long" in err
    # Read and rendered in one go, bad lines of both kinds share one count and one summary.
    with path.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    docs, pairs = user_chat_data(path, tok, max_tokens=64, on_error="skip")
    assert len(docs) == 1 and pairs == []
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "skipped 3 bad input" in err
    with pytest.raises(BadInputError, match=r"long.jsonl:4: messages\[0\].role 'robot'"):  # read before rendered
        user_chat_data(path, tok, max_tokens=64)


def test_dpo_through_the_data_path_starts_at_log_2(tok):
    prefs = [PreferenceDoc([{"role": "user", "content": "Say hi"}], [{"role": "assistant", "content": "hi there"}],
                           [{"role": "assistant", "content": "no"}], "a"),
             PreferenceDoc([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "Answer: 4"}],
                           [{"role": "assistant", "content": "five, I think, or so"}], "b")]
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      num_local_experts=2, attention_chunk_size=16, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    policy = Llama4(ModelConfig(text=text, vision=None))
    reference = Llama4(ModelConfig(text=text, vision=None))
    reference.load_state_dict(policy.state_dict())
    batch = PreferenceBatch.build(preference_pairs(prefs, tok), reference, tok.pad_id)
    assert batch.batch.input_ids.shape[0] == 4
    out = DPOLoss(beta=0.1)(policy, batch)
    assert float(out.loss_sum.detach()) / out.count == pytest.approx(math.log(2), abs=1e-7)
