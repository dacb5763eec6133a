"""Llama 4's chat format: messages -> token ids + loss mask (+ image tiles), and replies back.

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>       (per message)
    <|header_start|>assistant<|header_end|>\\n\\n                    (generation prompt)

A message is `{"role": ..., "content": ...}` with role system, user, assistant or ipython (tool
results; "tool" is accepted as an alias). Content is a string or a list of parts
`{"type": "text", "text": ...}` / `{"type": "image", "image": path | bytes | PIL image}`. An
assistant message may carry `"tool_call": code`, rendered after its content as
`<|python_start|>code<|python_end|>` and closed by `<|eom|>` instead of `<|eot|>`: the turn
pauses for the tool's result, which comes back as an ipython message.

The renderer owns the loss mask (SFT, DPO and RL all consume it): a token is supervised iff the
assistant wrote it, i.e. assistant content, tool calls and their closing `<|eot|>`/`<|eom|>`.
Headers, prompts, tool results and image tokens are not.

`herd.tokenizer.CHAT_TEMPLATE` is the same format as a Jinja template; `Tokenizer.save` stores it
so that `transformers`' `apply_chat_template` gives the same ids (images stay one `<|image|>` there; herd
expands each one to its tile layout when given an image processor). Unlike Meta's template, it
does not trim the system message or JSON-encode tool results: content is rendered as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .tokenizer import repair_surrogates

if TYPE_CHECKING:
    from .data.images import ImageProcessor
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython")



@dataclass
class RenderedChat:
    ids: list[int]
    loss_mask: list[bool]  # per id: True where the id is a supervised target
    pixel_values: torch.Tensor | None  # [N_tiles, 3, S, S] for the <|patch|> ids, in order

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Image:
    source: object
    where: str


def _content_parts(content, where: str) -> list[str | _Image]:
    """A message's content as text strings and images, validated."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[str | _Image] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image":
            parts.append(_Image(part.get("image"), f"{where}.content[{j}]"))
        elif kind == "video":  # its sampled frames, each an image in order (herd.data.video)
            from .data.video import DEFAULT_FRAMES, sample_frames

            frames = sample_frames(part.get("video"), part.get("frames", DEFAULT_FRAMES), name=f"{where}.content[{j}]")
            parts += [_Image(frame, f"{where}.content[{j}] frame {k}") for k, frame in enumerate(frames)]
        else:
            raise ValueError(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}, {{'type': 'image', "
                             f"'image': ...}} or {{'type': 'video', 'video': ...}}, got {part!r:.80}")
    return parts


def render_chat(messages: Sequence[dict], tokenizer: "Tokenizer", *, add_generation_prompt: bool = False,
                image_processor: "ImageProcessor | None" = None) -> RenderedChat:
    """Token ids, loss mask and image tiles of a conversation.

    Without an image processor each image stays a single `<|image|>` id (the template's view);
    with one, it becomes its full tile layout and its tiles are returned in `pixel_values`.
    """
    # Pieces in order: text (encoded together with neighbouring text, as the template's string
    # would be) or a special id; each with whether the assistant wrote it.
    pieces: list[tuple[str | int, bool]] = [(tokenizer.bos_id, False)]
    tiles: list[torch.Tensor] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        role = "ipython" if message["role"] == "tool" else message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}.role {message['role']!r} is not one of {', '.join(ROLES)} (or 'tool')")
        tool_call = message.get("tool_call")
        if tool_call is not None and (role != "assistant" or not isinstance(tool_call, str)):
            raise ValueError(f"{where}.tool_call must be a string on an assistant message")
        supervised = role == "assistant"
        pieces += [(tokenizer.header_start_id, False), (role, False), (tokenizer.header_end_id, False),
                   ("\n\n", False)]
        for part in _content_parts(message.get("content"), where):
            if isinstance(part, str):
                pieces.append((part, supervised))
            elif image_processor is None:
                pieces.append((tokenizer.image_id, False))
            else:
                if part.source is None:
                    raise ValueError(f"{part.where} has no 'image' (a path, bytes or PIL image)")
                name = f"{part.where} ({part.source})" if isinstance(part.source, (str, Path)) else part.where
                ids, pixels = image_processor.encode(part.source, tokenizer, name=name)
                pieces += [(t, False) for t in ids]
                tiles.append(pixels)
        if tool_call is not None:
            pieces += [(tokenizer.python_start_id, supervised), (tool_call, supervised),
                       (tokenizer.python_end_id, supervised), (tokenizer.eom_id, supervised)]
        else:
            pieces.append((tokenizer.eot_id, supervised))
    if add_generation_prompt:
        pieces += [(tokenizer.header_start_id, False), ("assistant", False), (tokenizer.header_end_id, False),
                   ("\n\n", False)]
    ids, mask = _encode_pieces(pieces, tokenizer)
    pixel_values = torch.cat(tiles) if tiles else None
    return RenderedChat(ids, mask, pixel_values)


def _encode_pieces(pieces: list[tuple[str | int, bool]], tokenizer: "Tokenizer") -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    run: list[tuple[str, bool]] = []  # adjacent text pieces, encoded as one string

    def flush():
        if not run:
            return
        parts = [(repair_surrogates(t), sup) for t, sup in run]  # as encode would, so lengths agree
        text = "".join(t for t, _ in parts)
        char_supervised = []  # per character: is it supervised?
        for t, sup in parts:
            char_supervised += [sup] * len(t)
        token_ids, offsets = tokenizer.encode_with_offsets(text)
        ids.extend(token_ids)
        # A token is supervised iff its last character is: "\n\n" + content may merge at the seam.
        mask.extend(char_supervised[end - 1] if end > 0 else False for _, end in offsets)
        run.clear()

    for piece, sup in pieces:
        if isinstance(piece, str):
            if piece:
                run.append((piece, sup))
        else:
            flush()
            ids.append(piece)
            mask.append(sup)
    flush()
    return ids, mask


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------

@dataclass
class AssistantReply:
    content: str
    tool_call: str | None  # the code between <|python_start|> and <|python_end|>
    stop: Literal["eot", "eom", "end_of_text"] | None  # None: the reply was cut off

    def to_message(self) -> dict:
        """The reply as a message, to append to the conversation."""
        message: dict = {"role": "assistant", "content": self.content}
        if self.tool_call is not None:
            message["tool_call"] = self.tool_call
        return message


def parse_assistant(ids: Sequence[int], tokenizer: "Tokenizer") -> AssistantReply:
    """Generated ids (after the generation prompt) -> content, tool call and stop reason."""
    ids = list(ids)
    stop_names = {tokenizer.eot_id: "eot", tokenizer.eom_id: "eom", tokenizer.end_of_text_id: "end_of_text"}
    stop = None
    for k, t in enumerate(ids):
        if t in stop_names:
            stop, ids = stop_names[t], ids[:k]
            break
    tool_call = None
    if tokenizer.python_start_id in ids:
        start = ids.index(tokenizer.python_start_id)
        end = ids.index(tokenizer.python_end_id, start) if tokenizer.python_end_id in ids[start:] else len(ids)
        tool_call = tokenizer.decode(ids[start + 1:end])
        ids = ids[:start]
    return AssistantReply(tokenizer.decode(ids), tool_call, stop)
