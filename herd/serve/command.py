"""`herd serve MODEL`: load a checkpoint and serve it with an OpenAI-compatible API and a chat page."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

GENERATION_KEYS = ("temperature", "top_p", "top_k")


def generation_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, where present."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return {k: config[k] for k in GENERATION_KEYS if config.get(k) is not None}


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError('herd serve needs FastAPI and uvicorn: pip install "herd[serve]"') from None
    from ..inference.session import load_model_and_tokenizer
    from .app import ServeConfig, create_app

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.quantize)
    config = ServeConfig(model_name=args.served_model_name or Path(args.model).resolve().name,
                         api_key=args.api_key or os.environ.get("HERD_API_KEY") or None,
                         max_batch=args.max_batch, max_waiting=args.max_waiting, compile=args.compile,
                         generation_defaults=generation_defaults(args.model))
    app = create_app(model, tokenizer, config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"herd serve: {config.model_name} at http://{host}:{args.port}  (OpenAI API at /v1, chat page at /)",
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print("herd serve: warning: listening beyond this machine without --api-key", flush=True)
    # uvicorn drains running requests on SIGTERM/Ctrl-C before the engine thread stops.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible API and a chat page")
    p.add_argument("model", help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model directory)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize each weight as it is read")
    p.add_argument("--compile", action="store_true", help="compiled decode steps (the first requests wait for it)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond the batch before 429")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: PyTorch's choice); on a shared "
                   "machine 1 avoids OpenMP threads stalling on a lost core")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set HERD_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.set_defaults(func=run)
