"""What the `herd generate` and `herd chat` commands share: loading a checkpoint with its tokenizer,
printing tokens as text while they stream, and a multi-turn chat session.

A chat turn re-renders the whole conversation with the chat template and prefills it again (no cache
is carried between turns): simple, and on the small models herd runs on a CPU prefill is cheap
beside decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import parse_assistant, render_chat
from ..model import Llama4
from ..tokenizer import Tokenizer
from .engine import generate_stream
from .fast import prepare_for_decoding


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    seed: int | None = None
    compile: bool = False  # decode steps as one compiled graph (herd.inference.compiled)


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                             quantize: str | None = None, dtype: torch.dtype | None = None
                             ) -> tuple[Llama4, Tokenizer]:
    """A checkpoint directory (config.json + safetensors) and the tokenizer.json beside it (or in
    `tokenizer_dir`); checks that the two agree on the vocabulary. The model is prepared for decoding
    (herd.inference.fast), after quantization."""
    from ..hf import from_pretrained

    model = prepare_for_decoding(from_pretrained(model_dir, dtype=dtype, quantize=quantize).eval())
    tokenizer = Tokenizer.from_dir(tokenizer_dir or model_dir)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.text.vocab_size}; pass the model's own tokenizer with --tokenizer")
    return model, tokenizer


class TextStream:
    """Turns token ids into text as they arrive. A multi-byte character may span tokens, so text is
    released only once it no longer ends in a partial character (U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], object]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0  # characters already written

    def add(self, token_id: int):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if not text.endswith("\ufffd"):
            self.write(text[self.shown:])
            self.shown = len(text)


def stream_reply(model: Llama4, tokenizer: Tokenizer, ids: list[int], pixel_values: torch.Tensor | None,
                 sampling: Sampling, write: Callable[[str], object]) -> list[int]:
    """Generates after `ids`, writing text as it comes; returns the new ids (stop token included).
    Ctrl-C (KeyboardInterrupt) ends the reply early and returns what was generated so far."""
    room = model.config.text.max_position_embeddings - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context "
                         f"(config.text.max_position_embeddings = {model.config.text.max_position_embeddings})")
    stream = generate_stream(
        model, torch.tensor([ids]), min(sampling.max_new_tokens, room), temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed, pixel_values=pixel_values,
        stop_token_ids=list(tokenizer.stop_ids), compile=sampling.compile)
    text = TextStream(tokenizer, write)
    try:
        for tokens in stream:
            text.add(int(tokens[0]))
    except KeyboardInterrupt:
        stream.close()
    return text.ids


@dataclass
class ChatSession:
    """A conversation: messages so far, and images waiting for the next user message."""

    model: Llama4
    tokenizer: Tokenizer
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    pending_images: list[bytes] = field(default_factory=list)

    def __post_init__(self):
        self.image_processor = None
        if self.model.vision is not None:
            from ..data.images import ImageProcessor

            self.image_processor = ImageProcessor.from_config(self.model.config.vision)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def attach_image(self, path: str | Path):
        """Reads and checks an image now, so that a bad file is reported before the turn."""
        if self.image_processor is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint): images cannot be attached")
        data = Path(path).expanduser().read_bytes()
        self.image_processor(data, name=str(path))  # raises ValueError for a malformed image
        self.pending_images.append(data)

    def reset(self):
        self.messages = self.messages[:1] if self.system else []
        self.pending_images = []

    def ask(self, text: str, write: Callable[[str], object]) -> str:
        """Adds a user message, streams the assistant's reply and keeps it in the conversation."""
        content: str | list = text
        if self.pending_images:
            content = [{"type": "image", "image": im} for im in self.pending_images] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        rendered = render_chat(self.messages + [user], self.tokenizer, add_generation_prompt=True,
                               image_processor=self.image_processor)
        new = stream_reply(self.model, self.tokenizer, rendered.ids, rendered.pixel_values, self.sampling, write)
        reply = parse_assistant(new, self.tokenizer)
        self.messages += [user, reply.to_message()]
        self.pending_images = []
        return reply.content
