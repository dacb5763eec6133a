"""The `herd` command: a table of subcommands, each defined beside the code it runs.

Every entry names a module that exposes `add_parser(subparsers)`; that function declares the
subcommand's flags and sets `func` to the function to call with the parsed arguments. Modules are
imported only when their subcommand is listed here, so `herd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining add_parser(subparsers)
COMMANDS = {
    "params": "herd.params",
    "train": "herd.pipeline",
    "tokenizer": "herd.tokenizer",
    "generate": "herd.inference.generate_cmd",
    "chat": "herd.inference.chat_cmd",
    "serve": "herd.serve.command",
    "eval": "herd.eval.command",
    "gguf": "herd.export.gguf",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Llama 4, readable, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A subcommand that sets `overrides=[]` takes free-form `--key=value` settings (`herd train`);
    # for every other one an unknown flag is the usual argparse error.
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: a message, not a traceback
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
