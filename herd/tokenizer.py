"""Byte-level BPE tokenizer: train herd's own, or load Llama 4's, behind one small class.

Llama 4 uses a tiktoken-style byte-level BPE (200,000 ranks) with an o200k-style pre-tokenizer
regex and 2,048 special slots after the ranks. herd trains the same kind of tokenizer with the
`tokenizers` library, small enough for a laptop (7,936 ranks + 256 special slots by default), and
keeps Llama 4's special-token names at the same offsets, so every id the model and the chat format
need follows from one number: the first special id (`herd.special_tokens`).

Both kinds are stored as a Hugging Face `tokenizer.json` + `tokenizer_config.json` (with herd's chat
template), so `transformers.AutoTokenizer.from_pretrained(dir)` gives the same ids as herd.

Two departures from a plain `tokenizers.Tokenizer`, both deliberate:
- `encode` never turns text such as "<|eot|>" into a special id. Special tokens enter a sequence
  only by id (the chat renderer places them), so user text cannot forge a turn boundary.
- Lone UTF-16 surrogates (e.g. from JSON "\\ud83d" escapes) are repaired the way tiktoken does:
  valid pairs are joined, lone ones become U+FFFD, instead of the library's TypeError.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from .special_tokens import OFFSETS, special_token_names

# The chat format of herd.chat as a Jinja template, for `transformers`' apply_chat_template. It is
# stored in tokenizer_config.json, so it lives here: herd.chat renders the same format in Python
# (tests/test_chat.py checks both give the same ids) and imports it from here, never the reverse.
CHAT_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}
    {{- '<|header_start|>' + role + '<|header_end|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- elif message['content'] is not none %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- else %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if message['tool_call'] is defined and message['tool_call'] is not none %}
        {{- '<|python_start|>' + message['tool_call'] + '<|python_end|><|eom|>' }}
    {%- else %}
        {{- '<|eot|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\n\n' }}
{%- endif %}
"""

# o200k-style pre-tokenizer: words with case classes and English contractions, numbers in runs of
# 1-3 digits, punctuation runs (keeping trailing newlines and '/'), newline runs, other whitespace.
# BPE merges never cross these pieces.
PRETOKENIZE_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

HERD_BPE_RANKS = 7936
HERD_SPECIAL_SLOTS = 256

# A held-out sample for the bytes-per-token report: the code corpus holds almost no Chinese, so this
# shows what a code-trained tokenizer does with a script it has barely seen (about 1 byte/token).
CHINESE_SAMPLE = (
    "今天早上下了一场小雨，空气变得清新。我们在公园里散步，看见孩子们在草地上放风筝。"
    "学习编程需要耐心：先读懂别人的代码，再动手写自己的程序，遇到错误时不要着急。"
    "这个模型把图像切成小块，每一块变成一串标记，和文字一起送进同一个网络。"
)


def repair_surrogates(text: str) -> str:
    """Join surrogate pairs and replace lone surrogates with U+FFFD (UTF-8 cannot hold them)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A byte-level BPE with Llama 4's special tokens after its `num_bpe_ranks` ordinary ids.

    Every special id herd uses is an attribute (`bos_id`, `eot_id`, `patch_id`, ...), derived from
    the offsets table, so no other module hard-codes a number.
    """

    def __init__(self, backend: Backend, source: str = "<memory>"):
        vocab = backend.get_vocab(with_added_tokens=True)
        if "<|begin_of_text|>" not in vocab:
            raise ValueError(f"{source}: no <|begin_of_text|> token; herd needs a tokenizer with "
                             "Llama 4's special tokens (train one with `herd tokenizer train`)")
        self.num_bpe_ranks = vocab["<|begin_of_text|>"]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.num_special_slots = self.vocab_size - self.num_bpe_ranks
        for name, offset in OFFSETS.items():
            if vocab.get(name) != self.num_bpe_ranks + offset:
                raise ValueError(
                    f"{source}: special token {name} has id {vocab.get(name)}, expected "
                    f"{self.num_bpe_ranks + offset} (first special id {self.num_bpe_ranks} + offset "
                    f"{offset}); the file does not follow Llama 4's special-token layout")
        self.source = source
        self._backend = backend  # parses "<|...|>" in text; used only for saving
        # herd's encoder treats special-token text as plain text (see the module docstring).
        self._plain = Backend.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self._plain.post_processor = None

        ids = {name: self.num_bpe_ranks + offset for name, offset in OFFSETS.items()}
        self.bos_id = ids["<|begin_of_text|>"]
        self.end_of_text_id = ids["<|end_of_text|>"]
        self.header_start_id = ids["<|header_start|>"]
        self.header_end_id = ids["<|header_end|>"]
        self.eom_id = ids["<|eom|>"]  # end of message: the turn pauses for a tool result
        self.eot_id = ids["<|eot|>"]  # end of turn
        self.python_start_id = ids["<|python_start|>"]
        self.python_end_id = ids["<|python_end|>"]
        self.pad_id = ids["<|finetune_right_pad|>"]
        self.image_start_id = ids["<|image_start|>"]
        self.image_end_id = ids["<|image_end|>"]
        self.tile_x_separator_id = ids["<|tile_x_separator|>"]
        self.tile_y_separator_id = ids["<|tile_y_separator|>"]
        self.image_id = ids["<|image|>"]
        self.patch_id = ids["<|patch|>"]
        # Generation stops at any of these.
        self.stop_ids: tuple[int, ...] = (self.end_of_text_id, self.eom_id, self.eot_id)
        # Tokens that only lay out an image; never a prediction target.
        self.image_layout_ids: frozenset[int] = frozenset((
            self.image_start_id, self.image_end_id, self.tile_x_separator_id,
            self.tile_y_separator_id, self.image_id, self.patch_id))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.num_bpe_ranks} BPE ranks + {self.num_special_slots} special slots, "
                f"from {self.source})")

    def special_id(self, name: str) -> int:
        """Id of any special token, reserved slots included, e.g. '<|vision_reserved_special_token_0|>'."""
        token_id = self._backend.token_to_id(name)
        if token_id is None or token_id < self.num_bpe_ranks:
            raise ValueError(f"{name!r} is not a special token of this tokenizer ({self.source})")
        return token_id

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_bpe_ranks

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ordinary text to ids. Special-token text ("<|eot|>") is encoded as plain bytes."""
        ids = self._plain.encode(repair_surrogates(text), add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.end_of_text_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel inside the Rust library."""
        encodings = self._plain.encode_batch([repair_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the (start, end) character span of `text` it covers."""
        enc = self._plain.encode(repair_surrogates(text), add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Ids to text. Byte sequences cut mid-character decode to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """The stored form of one token (byte-level symbols for ordinary tokens)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return token

    # ----------------------------------------------------------------------------------------
    # Files
    # ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path, *, model_max_length: int = 131072) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` carrying herd's chat template."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            # Chat models end a reply with <|eot|>; Llama 4's instruct tokenizer names it eos too.
            "eos_token": "<|eot|>",
            "pad_token": "<|finetune_right_pad|>",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a directory (herd's, or a Llama 4 checkpoint's) or a file path."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: a tokenizer directory holds tokenizer.json "
                                    "(create one with `herd tokenizer train --out DIR`)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the library raises plain Exception for malformed files
            raise ValueError(f"{file}: not a readable tokenizers JSON file ({e})") from None
        return cls(backend, source=str(file))


load_tokenizer = Tokenizer.from_dir


def train_tokenizer(texts: Iterable[str], *, num_bpe_ranks: int = HERD_BPE_RANKS,
                    num_special_slots: int = HERD_SPECIAL_SLOTS, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with exactly `num_bpe_ranks` ordinary ids on `texts`, then append the
    special slots in Llama 4's order (use num_special_slots=2048 for Llama 4's full layout)."""
    if num_bpe_ranks <= 256:
        raise ValueError(f"num_bpe_ranks must exceed the 256 single-byte tokens, got {num_bpe_ranks}")
    names = special_token_names(num_special_slots)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        # Regex already split the text; ByteLevel only maps bytes to printable symbols.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe_ranks, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator((repair_surrogates(t) for t in texts), trainer=trainer)
    learned = backend.get_vocab_size()
    if learned != num_bpe_ranks:
        raise ValueError(f"the training text yielded only {learned} BPE ranks, fewer than the "
                         f"{num_bpe_ranks} asked for; give more text or lower num_bpe_ranks")
    backend.add_special_tokens(names)  # ids num_bpe_ranks, num_bpe_ranks + 1, ... in list order
    bos = num_bpe_ranks
    # Like Llama 4's tokenizer.json: a plain `transformers` call prepends <|begin_of_text|>.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return Tokenizer(backend, source=f"trained ({num_bpe_ranks} ranks)")


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over `texts`: higher means better compression."""
    n_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(list(texts)))
    return n_bytes / max(n_tokens, 1)


# --------------------------------------------------------------------------------------------
# `herd tokenizer train` / `herd tokenizer eval`
# --------------------------------------------------------------------------------------------

def _report(tokenizer: Tokenizer, max_files: int) -> None:
    from .data.corpora import stdlib_texts

    held_out = [doc.text for doc in stdlib_texts("validation", max_files=max_files)]
    print(f"bytes/token on held-out stdlib code ({len(held_out)} files): "
          f"{bytes_per_token(tokenizer, held_out):.2f}")
    print(f"bytes/token on a Chinese sample ({len(CHINESE_SAMPLE.encode())} bytes): "
          f"{bytes_per_token(tokenizer, [CHINESE_SAMPLE]):.2f}")


def _train_cmd(args: argparse.Namespace) -> int:
    from .data.corpora import read_user_texts, stdlib_texts

    if args.data:
        texts = [doc.text for doc in read_user_texts(args.data, on_error=args.on_error)]
        what = f"{args.data}"
    else:
        texts = [doc.text for doc in stdlib_texts("train", max_bytes=args.max_bytes)]
        what = "the Python standard library (train split)"
    n_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
    print(f"training on {len(texts)} texts, {n_bytes / 1e6:.1f} MB, from {what}")
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts, num_bpe_ranks=args.bpe_ranks, num_special_slots=args.special_slots)
    print(f"trained {tokenizer} in {time.perf_counter() - start:.1f} s")
    out = tokenizer.save(args.out)
    print(f"saved {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}")
    _report(tokenizer, max_files=args.eval_files)
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.from_dir(args.dir)
    print(tokenizer)
    _report(tokenizer, max_files=args.eval_files)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or evaluate a byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True
    train = sub.add_parser("train", help="train on the stdlib code corpus or on your own data")
    train.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    train.add_argument("--data", default=None,
                       help="a folder of .txt files or a JSONL file of {'text': ...} (default: Python stdlib)")
    train.add_argument("--bpe-ranks", type=int, default=HERD_BPE_RANKS,
                       help="ordinary BPE ids before the special slots (7936 + 256 = the tiny preset's 8192)")
    train.add_argument("--special-slots", type=int, default=HERD_SPECIAL_SLOTS,
                       help="256 for herd's small tokenizers, 2048 for Llama 4's layout")
    train.add_argument("--max-bytes", type=int, default=None, help="cap the stdlib training text")
    train.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                       help="on an unreadable file or bad line: skip it (counted) or stop")
    train.add_argument("--eval-files", type=int, default=200, help="held-out files for bytes/token")
    train.set_defaults(func=_train_cmd)
    evaluate = sub.add_parser("eval", help="bytes/token of a saved tokenizer on held-out code and Chinese")
    evaluate.add_argument("dir", help="directory holding tokenizer.json")
    evaluate.add_argument("--eval-files", type=int, default=200)
    evaluate.set_defaults(func=_eval_cmd)
