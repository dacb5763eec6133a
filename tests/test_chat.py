import pytest
from PIL import Image

from herd.chat import parse_assistant, render_chat
from herd.data.corpora import stdlib_texts
from herd.data.images import ImageProcessor
from herd.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=200_000)], num_bpe_ranks=500)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  You are terse.  \n"},
     {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": [{"type": "text", "text": "What is in "},
                                  {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"}]},
     {"role": "assistant", "content": "\nTwo cats. 猫が二匹 🐱"}],
    [{"role": "user", "content": "list files"},
     {"role": "assistant", "content": "Let me look.", "tool_call": "import os\nprint(os.listdir('.'))"},
     {"role": "ipython", "content": "['a.py']"},
     {"role": "assistant", "content": "One file: a.py"},
     {"role": "tool", "content": "{\"ok\": true}"}],
    [{"role": "user", "content": "time?"},
     {"role": "assistant", "content": None, "tool_call": "import time; print(time.time())"},
     {"role": "ipython", "content": [{"type": "text", "text": "1700000000.0"}]}],
]


def _text(tok, rendered):
    return tok.decode(rendered.ids)


def test_layout_matches_the_spec(tok):
    r = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tok,
                    add_generation_prompt=True)
    assert _text(tok, r) == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nS<|eot|>"
                             "<|header_start|>user<|header_end|>\n\nU<|eot|>"
                             "<|header_start|>assistant<|header_end|>\n\n")
    assert r.ids[0] == tok.bos_id and not any(r.loss_mask)  # nothing the assistant wrote


def test_loss_mask_covers_exactly_what_the_assistant_wrote(tok):
    r = render_chat(CONVERSATIONS[3], tok)
    supervised = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if m])
    assert supervised == ("Let me look.<|python_start|>import os\nprint(os.listdir('.'))<|python_end|><|eom|>"
                          "One file: a.py<|eot|>")
    assert len(r.loss_mask) == len(r.ids)
    # The tool result and every header are context, not targets.
    unsupervised = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if not m])
    assert "['a.py']" in unsupervised and "<|header_start|>assistant<|header_end|>\n\n" in unsupervised


def test_a_reply_starting_with_newline_is_still_fully_supervised(tok):
    r = render_chat(CONVERSATIONS[2], tok)
    supervised = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if m])
    assert supervised.endswith("Two cats. 猫が二匹 🐱<|eot|>") and "\nTwo" in supervised


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_same_ids_as_transformers_apply_chat_template(tok, tmp_path, index, generation_prompt):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS[index]
    theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert render_chat(messages, tok, add_generation_prompt=generation_prompt).ids == theirs


def test_images_expand_to_their_tile_layout(tok):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (64, 64), "red")},
        {"type": "image", "image": Image.new("RGB", (128, 64), "blue")},
        {"type": "text", "text": "Compare."}]}]
    plain = render_chat(messages, tok)
    assert plain.ids.count(tok.image_id) == 2 and plain.pixel_values is None
    r = render_chat(messages, tok, image_processor=proc)
    assert r.pixel_values.shape == (1 + 3, 3, 64, 64)  # 1 tile, then 1x2 tiles + thumbnail
    assert r.ids.count(tok.patch_id) == r.pixel_values.shape[0] * proc.tokens_per_tile
    assert r.ids.count(tok.image_start_id) == 2 and r.ids.count(tok.image_id) == 2
    assert not any(m for i, m in zip(r.ids, r.loss_mask) if i == tok.patch_id)


def test_parse_reply_with_tool_call(tok):
    reply_ids = (tok.encode("Checking.") + [tok.python_start_id] + tok.encode("print(2 ** 10)")
                 + [tok.python_end_id, tok.eom_id] + tok.encode("ignored"))
    reply = parse_assistant(reply_ids, tok)
    assert (reply.content, reply.tool_call, reply.stop) == ("Checking.", "print(2 ** 10)", "eom")
    plain = parse_assistant(tok.encode("Hi there") + [tok.eot_id], tok)
    assert (plain.content, plain.tool_call, plain.stop) == ("Hi there", None, "eot")
    cut = parse_assistant(tok.encode("unfinished"), tok)
    assert cut.stop is None and cut.content == "unfinished"


def test_render_parse_round_trip(tok):
    messages = CONVERSATIONS[3][:2]
    full = render_chat(messages, tok)
    prompt = render_chat(messages[:1], tok, add_generation_prompt=True)
    assert full.ids[: len(prompt.ids)] == prompt.ids
    reply = parse_assistant(full.ids[len(prompt.ids):], tok)
    assert reply.to_message() == messages[1]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role 'robot'"),
    ([{"content": "x"}], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\].content\[0\]"),
    ([{"role": "user", "content": "x", "tool_call": "f()"}], r"messages\[0\].tool_call"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be"),
])
def test_bad_messages_say_where(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages, tok)


def test_missing_image_is_a_clear_error(tok, tmp_path):
    proc = ImageProcessor(tile_size=64, patch_size=8)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "nope.png")}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\].*nope.png"):
        render_chat(messages, tok, image_processor=proc)
