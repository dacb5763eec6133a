"""Chat data for post-training, from what ships and from the user, as documents and pairs.

Three sources of conversations:
- the verifiable tasks (herd.tasks): each problem with its worked answer;
- an instruction set from the embedded code corpus: a stdlib function's signature and docstring
  as the request, the function itself (signature and body, docstring left out) as the answer,
  found with `ast`; the stdlib's train/validation split carries over;
- the user's JSONL in TRL's formats, read by herd.data.corpora (`messages`, `prompt`/`completion`,
  `prompt`/`chosen`/`rejected`).

Everything is rendered by the chat renderer (herd.chat), which owns the loss mask: only what the
assistant wrote, and the `<|eot|>` that ends it, is a target. SFT conversations become the same
`Document`s pretraining packs (herd.data.documents), so SFT takes the one data path; preference
pairs stay pairs. Over-long conversations and images that fail to load are bad records like a bad
JSON line: counted and skipped, or stopped at, by the caller's `on_error`.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..chat import RenderedChat, render_chat
from .corpora import ChatDoc, InputErrors, OnError, PreferenceDoc, read_text_file, read_user_data, stdlib_files
from .documents import Document, chat_document
from .images import ImageError

if TYPE_CHECKING:
    from ..tasks import Problem
    from ..tokenizer import Tokenizer
    from .images import ImageProcessor


def task_conversations(problems: Iterable["Problem"]) -> list[ChatDoc]:
    """Each problem and its worked answer as a conversation (SFT data for the tasks)."""
    return [ChatDoc(p.messages(with_answer=True), f"{p.task}:{p.key}") for p in problems]


# --------------------------------------------------------------------------------------------
# Instructions from the code corpus
# --------------------------------------------------------------------------------------------

def function_instruction(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[dict] | None:
    """(request, answer) chat for one function with a docstring, or None if it has no docstring or
    nothing after it."""
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:
        return None
    lines = source.splitlines()
    header = lines[node.lineno - 1:node.body[0].lineno - 1]  # from `def` to the line before the docstring
    if not header or not header[-1].rstrip().endswith(":"):
        return None  # docstring on the `def` line, or a comment before it: no clean split
    body = lines[node.body[1].lineno - 1:node.end_lineno]
    header = textwrap.dedent("\n".join(header))
    body = textwrap.dedent("\n".join(body))
    docstring = textwrap.indent(f'"""{doc}"""', "    ")
    request = f"Write this Python function:\n\n{header}\n{docstring}"
    answer = f"{header}\n{textwrap.indent(body, '    ')}"
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def code_instructions(split: Literal["train", "validation"] = "train", *, max_items: int | None = None,
                      max_answer_chars: int = 800) -> Iterator[ChatDoc]:
    """Function-writing conversations from the stdlib's `split`, in file order (test suites skipped)."""
    errors = InputErrors("skip")
    count = 0
    if max_items is not None and max_items <= 0:
        return
    for path in stdlib_files(split):
        if "test" in path.parts or "tests" in path.parts:
            continue
        source = read_text_file(path, errors)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken (lib2to3 fixtures)
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            messages = function_instruction(source, node)
            if messages is None or len(messages[1]["content"]) > max_answer_chars:
                continue
            yield ChatDoc(messages, f"{path}:{node.lineno}")
            count += 1
            if max_items is not None and count >= max_items:
                return


# --------------------------------------------------------------------------------------------
# Rendering, with the bad-record policy
# --------------------------------------------------------------------------------------------

def _render(messages: list[dict], source: str, tokenizer: "Tokenizer", processor: "ImageProcessor | None",
            max_tokens: int | None, errors: InputErrors) -> RenderedChat | None:
    try:
        rendered = render_chat(messages, tokenizer, image_processor=processor)
    except (ImageError, ValueError) as e:
        errors(source, str(e))
        return None
    if max_tokens is not None and len(rendered) > max_tokens:
        errors(source, f"over-long: {len(rendered)} tokens, more than max_tokens={max_tokens}")
        return None
    if not any(rendered.loss_mask):
        errors(source, "no assistant message: nothing to learn from")
        return None
    return rendered


def render_chats(chats: Iterable[ChatDoc], tokenizer: "Tokenizer", processor: "ImageProcessor | None" = None, *,
                 max_tokens: int | None = None, on_error: OnError = "stop",
                 errors: InputErrors | None = None) -> list[RenderedChat]:
    """Conversations rendered by the chat renderer (loss mask: the assistant's tokens); bad ones
    (unrenderable, over-long, nothing to learn) are counted under `on_error`."""
    own = errors is None
    errors = InputErrors(on_error) if own else errors
    rendered = [_render(chat.messages, chat.source, tokenizer, processor, max_tokens, errors) for chat in chats]
    if own:
        errors.print_summary()
    return [r for r in rendered if r is not None]


def chat_documents(chats: Iterable[ChatDoc], tokenizer: "Tokenizer", processor: "ImageProcessor | None" = None, *,
                   max_tokens: int | None = None, on_error: OnError = "stop",
                   errors: InputErrors | None = None) -> list[Document]:
    """Conversations as packable documents whose targets are the assistant's tokens only."""
    rendered = render_chats(chats, tokenizer, processor, max_tokens=max_tokens, on_error=on_error, errors=errors)
    return [chat_document(r, tokenizer, processor.tokens_per_tile if processor else None) for r in rendered]


def preference_pairs(prefs: Iterable[PreferenceDoc], tokenizer: "Tokenizer",
                     processor: "ImageProcessor | None" = None, *, max_tokens: int | None = None,
                     on_error: OnError = "stop", errors: InputErrors | None = None
                     ) -> list[tuple[RenderedChat, RenderedChat]]:
    """(chosen, rejected) renderings of each pair: the same prompt with each reply."""
    own = errors is None
    errors = InputErrors(on_error) if own else errors
    pairs = []
    for pref in prefs:
        chosen = _render(pref.prompt + pref.chosen, pref.source, tokenizer, processor, max_tokens, errors)
        if chosen is None:
            continue
        rejected = _render(pref.prompt + pref.rejected, pref.source, tokenizer, processor, max_tokens, errors)
        if rejected is not None:
            pairs.append((chosen, rejected))
    if own:
        errors.print_summary()
    return pairs


def split_records(records: Iterable) -> tuple[list[ChatDoc], list[PreferenceDoc]]:
    """The chats and the preference pairs of a user's records (other kinds are left out)."""
    records = list(records)
    return ([r for r in records if isinstance(r, ChatDoc)], [r for r in records if isinstance(r, PreferenceDoc)])


def user_chat_data(path: str | Path, tokenizer: "Tokenizer", processor: "ImageProcessor | None" = None, *,
                   max_tokens: int | None = None, on_error: OnError = "stop"
                   ) -> tuple[list[Document], list[tuple[RenderedChat, RenderedChat]]]:
    """A user's post-training data: the conversations as SFT documents and the preference pairs,
    with one count (and one summary) of the bad records found reading and rendering them."""
    errors = InputErrors(on_error)
    chats, prefs = split_records(read_user_data(path, errors=errors))
    docs = chat_documents(chats, tokenizer, processor, max_tokens=max_tokens, errors=errors)
    pairs = preference_pairs(prefs, tokenizer, processor, max_tokens=max_tokens, errors=errors)
    errors.print_summary()
    return docs, pairs


def supervised_text(rendered: RenderedChat, tokenizer: "Tokenizer") -> str:
    """What the loss mask selects, decoded (for tests and for reading data)."""
    return tokenizer.decode([t for t, m in zip(rendered.ids, rendered.loss_mask) if m])

