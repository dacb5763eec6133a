"""`herd chat`: an interactive, streaming, multi-turn conversation with a checkpoint.

    /image PATH   attach an image to your next message
    /reset        start the conversation over
    /quit         leave (Ctrl-D too)
Ctrl-C stops the reply being written and keeps the session.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .generate_cmd import add_sampling_flags, sampling_from_args
from .session import ChatSession, load_model_and_tokenizer


def chat_loop(session: ChatSession, read: Callable[[str], str] = input,
              write: Callable[[str], object] = sys.stdout.write) -> None:
    """Reads lines until /quit or end of input. No user error ends the session: bad images, a
    conversation longer than the context or a stopped reply are reported, and the loop goes on."""
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/quit or Ctrl-D to leave)\n")
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        try:
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise ValueError("usage: /image PATH")
                session.attach_image(path)
                write(f"(image attached: {path})\n")
                continue
            if line.startswith("/"):
                raise ValueError(f"unknown command {line.split()[0]}; use /image PATH, /reset or /quit")
            session.ask(line, lambda s: (write(s), _flush()))
            write("\n")
        except (ValueError, OSError) as e:  # malformed image, unreadable file, prompt too long
            write(f"\n(error: {e})\n")


def _flush():
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.quantize)
    session = ChatSession(model, tokenizer, sampling_from_args(args), system=args.system)
    print(__doc__.split("\n\n", 1)[1].strip())
    chat_loop(session)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive multi-turn chat with a checkpoint (/image PATH attaches)")
    p.add_argument("--system", help="system message")
    add_sampling_flags(p)
    p.set_defaults(func=run)
