"""Token ids -> text for a streaming reply: never half a UTF-8 character, never part of a stop string.

Byte-level BPE tokens are byte strings, so one character may span tokens: the text decoded so far
is held back while it ends in U+FFFD (an unfinished character). A stop string may span tokens too:
text that ends with the beginning of a stop string is held back until the next token shows whether
the stop string completes (the reply ends before it) or not (the held text is released).

The whole reply is decoded again for each token rather than keeping byte offsets: decoding a few
thousand ids costs microseconds in the Rust tokenizer, and it keeps this obviously correct.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer


class IncrementalText:
    """`hold_from`: a token id after which nothing more is released as text (a chat reply's
    `<|python_start|>`: the tool call that follows is reported as a tool call, not as content)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), hold_from: int | None = None):
        self.tokenizer, self.hold_from = tokenizer, hold_from
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False  # a stop string completed: the reply is over

    def add(self, token_ids: Sequence[int]) -> str:
        """Adds new tokens; returns the text that may be released now ('' when all is held back)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self._text()
        # A stop string can only end in the new part, but may begin up to its length before it.
        search_from = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text, min(hits))
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._partial_stop(text[:end])
        return self._release(text, end)

    def flush(self) -> str:
        """At the end of the reply (stop token or length): releases whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self._text(), None)

    @property
    def held(self) -> bool:
        """Has `hold_from` appeared?"""
        return self.hold_from is not None and self.hold_from in self.ids

    def _text(self) -> str:
        ids = self.ids[:self.ids.index(self.hold_from)] if self.held else self.ids
        return self.tokenizer.decode(ids, skip_special=True)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        piece, self.sent = text[self.sent:end], end
        return piece

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def _byte_symbols() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is stored as one printable character;
    printable Latin-1 bytes as themselves, the rest as characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


_SYMBOLS = _byte_symbols()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for (a special token: its name in UTF-8)."""
    text = tokenizer.token_text(token_id)
    if tokenizer.is_special(token_id) or any(c not in _SYMBOLS for c in text):
        return text.encode()
    return bytes(_SYMBOLS[c] for c in text)


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text for logprobs: invalid UTF-8 (part of a character) as `bytes:\\xNN` escapes."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
