"""Raw data readers: the embedded code corpus and a user's own folder or JSONL files.

The embedded corpus is the Python standard library's own `.py` sources, found through `sysconfig`,
so herd's main training job needs no download. Files are split into train and validation by a
stable hash of their path relative to the stdlib root: the same file lands in the same split on
every machine and every run, and adding a file never moves another.

User data is a folder (or single file) of:
- plain text files (any extension but .jsonl and image formats): one document per file;
- JSONL, one record per line: `{"text": ...}`, `{"image": path, "text": ...}` (an image-text pair;
  the path is relative to the JSONL file), or a chat in one of TRL's formats:
  `{"messages": [...]}`, `{"prompt": ..., "completion": ...}` (read as one chat) and
  `{"prompt": ..., "chosen": ..., "rejected": ...}` (a preference pair). A prompt, completion,
  chosen or rejected value is a list of messages or a plain string (TRL's "standard" format: a
  user turn for the prompt, an assistant turn for the others). Message content is a string or a
  list of parts, `{"type": "text", "text": ...}` / `{"type": "image", "image": path}`.

Bad input (unreadable file, non-UTF-8 text, a line that is not JSON or lacks its field, a message
with a missing or unknown role or empty content, an image that does not open) is reported as
`file:line: problem`. With `on_error="stop"` the first one raises `BadInputError`; with "skip" it
is counted and a summary naming the first few is printed to stderr when the reader finishes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..chat import ROLES
from .images import ImageError, load_image

OnError = Literal["skip", "stop"]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


class BadInputError(ValueError):
    """A file or line of input that cannot be used; the message starts with `file:line`."""


@dataclass(frozen=True)
class TextDoc:
    text: str
    source: str  # "path" or "path:line"


@dataclass(frozen=True)
class ChatDoc:
    messages: list[dict]
    source: str


@dataclass(frozen=True)
class ImageTextDoc:
    image: Path
    text: str
    source: str


@dataclass(frozen=True)
class PreferenceDoc:
    prompt: list[dict]  # the conversation so far
    chosen: list[dict]  # the preferred reply (assistant messages)
    rejected: list[dict]
    source: str


Record = TextDoc | ChatDoc | ImageTextDoc | PreferenceDoc


@dataclass
class InputErrors:
    """Applies the skip/stop policy and keeps the count of what was skipped."""

    on_error: OnError = "stop"
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {self.on_error!r}")

    def __call__(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if self.on_error == "stop":
            raise BadInputError(message + " (pass on_error='skip' / --on-error skip to skip bad input)")
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        return f"skipped {self.skipped} bad input(s); first: " + "; ".join(self.examples)

    def print_summary(self) -> None:
        if self.skipped:
            print(f"herd data: {self.summary()}", file=sys.stderr)


def read_text_file(path: Path, errors: InputErrors) -> str | None:
    """The file's text, or None (after reporting) if it is unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        errors(str(path), f"cannot read file ({e.strerror or e})")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        errors(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})")
        return None


# --------------------------------------------------------------------------------------------
# The Python standard library as a code corpus
# --------------------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (not by Python's per-process hash seed)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def stdlib_files(split: Literal["train", "validation"], validation_fraction: float = 0.05) -> list[Path]:
    """The stdlib's .py files in one split, sorted by relative path (site-packages excluded)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts:
            continue
        in_validation = stable_fraction(rel.as_posix()) < validation_fraction
        if in_validation == (split == "validation"):
            files.append(rel)
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def stdlib_texts(split: Literal["train", "validation"] = "train", *, max_files: int | None = None,
                 max_bytes: int | None = None, on_error: OnError = "skip") -> Iterator[TextDoc]:
    """Source files of the stdlib split, one document each. A few stdlib files are deliberately
    not UTF-8 (encoding tests); they are skipped and counted."""
    errors = InputErrors(on_error)
    total = 0
    for i, path in enumerate(stdlib_files(split)):
        if max_files is not None and i >= max_files:
            break
        text = read_text_file(path, errors)
        if text is None or not text.strip():
            continue
        total += len(text.encode("utf-8"))
        yield TextDoc(text, str(path))
        if max_bytes is not None and total >= max_bytes:
            break
    errors.print_summary()


# --------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------

def _as_messages(value, role: str):
    """TRL's standard format (a plain string) as one message; a list is already messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _check_messages(messages, base: Path, name: str = "messages") -> tuple[list[dict] | None, str | None]:
    """(the messages with image paths resolved against `base`, None) or (None, why they are not a chat)."""
    if not isinstance(messages, list) or not messages:
        return None, f"'{name}' must be a non-empty list of messages or a string"
    checked = []
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return None, f"{where} must be an object with 'role' and 'content'"
        if m["role"] not in ROLES + ("tool",):
            return None, f"{where}.role {m['role']!r} is not one of {', '.join(ROLES)} (or 'tool')"
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part)
                elif kind == "image" and isinstance(part.get("image"), str):
                    path = base / part["image"]
                    try:  # opened now, so that a broken image is reported with its line, not mid-training
                        load_image(path)
                    except ImageError as e:
                        return None, f"{where}.content[{j}]: {e}"
                    parts.append({"type": "image", "image": str(path)})
                else:
                    return None, (f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} or "
                                  f"{{'type': 'image', 'image': path}}")
            content = parts
        elif not (isinstance(content, str) or content is None):
            return None, f"{where}.content must be a string or a list of parts"
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
        has_image = isinstance(content, list) and any(p["type"] == "image" for p in content)
        if not text.strip() and not has_image and not m.get("tool_call"):
            return None, f"{where} ({m['role']}) has empty content"
        checked.append({**m, "content": content})
    return checked, None


def _chat_record(obj: dict, base: Path, where: str) -> tuple[Record | None, str | None]:
    """A `messages`, `prompt`/`completion` or `prompt`/`chosen`/`rejected` record, or why it is bad."""
    if "messages" in obj:
        messages, problem = _check_messages(obj["messages"], base)
        return (ChatDoc(messages, where) if messages else None), problem
    if "prompt" not in obj:
        return None, "a 'chosen'/'rejected' pair needs its 'prompt'"
    prompt, problem = _check_messages(_as_messages(obj["prompt"], "user"), base, "prompt")
    if problem:
        return None, problem
    names = ("chosen", "rejected") if "chosen" in obj or "rejected" in obj else ("completion",)
    replies = []
    for name in names:
        if name not in obj:
            return None, f"a preference record needs 'prompt', 'chosen' and 'rejected'; '{name}' is missing"
        reply, problem = _check_messages(_as_messages(obj[name], "assistant"), base, name)
        if problem:
            return None, problem
        if not any(m["role"] == "assistant" for m in reply):
            return None, f"'{name}' has no assistant message: it is what the model should (not) answer"
        replies.append(reply)
    if len(replies) == 1:
        return ChatDoc(prompt + replies[0], where), None
    return PreferenceDoc(prompt, replies[0], replies[1], where), None


def read_jsonl(path: Path, errors: InputErrors) -> Iterator[Record]:
    """Records of one JSONL file; each bad line is reported with its line number."""
    text = read_text_file(path, errors)
    if text is None:
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors(where, f"expected a JSON object, got {type(obj).__name__}")
        elif any(key in obj for key in ("messages", "prompt", "chosen", "rejected")):
            record, problem = _chat_record(obj, path.parent, where)
            if problem:
                errors(where, problem)
            else:
                yield record
        elif "image" in obj:
            if not isinstance(obj["image"], str) or not isinstance(obj.get("text"), str):
                errors(where, "an image-text record needs string fields 'image' (a path) and 'text'")
            else:
                yield ImageTextDoc(path.parent / obj["image"], obj["text"], where)
        elif isinstance(obj.get("text"), str):
            yield TextDoc(obj["text"], where)
        else:
            errors(where, "expected a string field 'text', 'image' + 'text', or a chat ('messages', "
                          "'prompt' + 'completion', or 'prompt' + 'chosen' + 'rejected')")


def read_user_data(path: str | Path, *, on_error: OnError = "stop", errors: InputErrors | None = None
                   ) -> Iterator[Record]:
    """Every record under `path` (a file or a folder, read recursively in sorted order). A caller
    that finds more bad records in what it reads passes its own `errors`, so that one count and one
    summary cover both (it then prints the summary)."""
    path = Path(path)
    own = errors is None
    errors = InputErrors(on_error) if own else errors
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a folder of text/JSONL files or one file")
    if path.is_file():
        files = [path]
    else:  # hidden files are skipped; broken links are kept, to be reported as unreadable
        files = sorted(p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.is_dir()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from read_jsonl(file, errors)
        elif suffix not in IMAGE_SUFFIXES:  # images are referenced from JSONL, not read alone
            text = read_text_file(file, errors)
            if text is not None and text.strip():
                yield TextDoc(text, str(file))
    if own:
        errors.print_summary()


def read_user_texts(path: str | Path, *, on_error: OnError = "stop") -> Iterator[TextDoc]:
    """Only the plain-text documents of `read_user_data` (for tokenizer training and pretraining)."""
    for record in read_user_data(path, on_error=on_error):
        if isinstance(record, TextDoc):
            yield record
