"""`herd generate`: complete one prompt with a checkpoint, streaming the text to stdout."""

from __future__ import annotations

import argparse
import sys

from .session import Sampling, load_model_and_tokenizer, stream_reply


def add_sampling_flags(p: argparse.ArgumentParser):
    """Flags shared with `herd chat`."""
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model directory)")
    p.add_argument("--quantize", choices=["int8", "int4", "fp8"],
                   help="quantize each weight as it is read (peak memory near the quantized size)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled step: about 2x faster on CPU, but the first reply waits 10-30 s "
                        "for the compiler (again each time the conversation doubles in length)")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.compile)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.quantize)
    if args.chat or args.image:
        from .session import ChatSession

        session = ChatSession(model, tokenizer, sampling_from_args(args))
        for path in args.image or []:
            session.attach_image(path)
        session.ask(args.prompt, _write)
    else:
        ids = tokenizer.encode(args.prompt, bos=True)
        stream_reply(model, tokenizer, ids, None, sampling_from_args(args), _write)
    print()
    return 0


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a checkpoint (streams to stdout)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--image", action="append", help="attach an image (implies --chat); may repeat")
    add_sampling_flags(p)
    p.set_defaults(func=run)
