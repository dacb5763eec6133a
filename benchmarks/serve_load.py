"""Load test of `herd serve`: streams at concurrency 1, 4, 16 and 64 on 127.0.0.1.

    python benchmarks/serve_load.py [--model DIR] [--url http://127.0.0.1:PORT] [--max-tokens 32]
                                    [--requests-per-stream 2] [--max-seconds 120] [--threads N] [--out serve_load]

Without --url it starts `herd serve` itself (--max-batch 64) on a free port: on --model, or on a
random-weight model of benchmarks/common.py's shape (hidden 256, 8 MoE layers) with a small tokenizer
trained here. Every request is a streamed completion of the same prompt with `ignore_eos`, so each
produces exactly --max-tokens tokens. At concurrency c, c client tasks each send
--requests-per-stream requests one after another (after --max-seconds a level starts no new request).

Per level: errors (must be 0), time to first token and inter-token latency (p50, p99; the gaps
between streamed chunks: the server sends one per engine output, usually one token, even while
its text is held back as part of a character or a possible stop string), requests/s and output
tokens/s (all tokens over the level's wall time). Written as JSON and a plot (OUT.json, OUT.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "def quicksort(items):\n    "


def build_model(directory: Path) -> Path:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import benchmark_config

    from herd.data.corpora import stdlib_texts
    from herd.model import Llama4
    from herd.tokenizer import train_tokenizer

    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=300_000)], num_bpe_ranks=2048)
    config = benchmark_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eot_id,
                              pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    herd.save_pretrained(Llama4(config), directory)
    tok.save(directory)
    return directory


def start_server(model: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-waiting", "256",
                             *(["--threads", str(threads)] if threads else [])],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(client, timeout: float = 120.0) -> str:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await client.models.list()).data[0].id
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up") from None
            await asyncio.sleep(0.2)


async def one_request(client, model: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    last, ttft, gaps, tokens = sent, None, [], 0
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:  # one chunk per engine output, even while its text is held back
            if ttft is None:
                ttft = now - sent
            else:
                gaps.append(now - last)
            last = now
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens}


async def level(client, model: str, concurrency: int, per_stream: int, max_tokens: int, max_seconds: float) -> dict:
    results, errors = [], []
    start = time.perf_counter()

    async def stream_task():
        for _ in range(per_stream):
            if time.perf_counter() - start > max_seconds:
                return
            try:
                results.append(await one_request(client, model, max_tokens))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:200])

    await asyncio.gather(*(stream_task() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "requests_per_s": len(results) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(gaps, 50),
            "itl_p99_s": pct(gaps, 99)}


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["output_tokens_per_s"] for r in rows], "o-")
    a.set(xscale="log", xticks=c, xticklabels=c, xlabel="concurrent streams", ylabel="output tokens/s",
          title="aggregate throughput")
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p50_s", "s-"), ("itl_p99_s", "s--")):
        b.plot(c, [r[key] * 1000 if r[key] is not None else np.nan for r in rows], style, label=key[:-2])
    b.set(xscale="log", yscale="log", xticks=c, xticklabels=c, xlabel="concurrent streams", ylabel="ms",
          title="latency")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint to serve (default: a random benchmark-shaped model)")
    p.add_argument("--url", help="an already running server (no server is started)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per level")
    p.add_argument("--threads", type=int, help="the server's CPU threads (herd serve --threads)")
    p.add_argument("--out", default="serve_load")
    args = p.parse_args()
    import openai

    levels = [int(c) for c in args.concurrency.split(",")]
    proc, tmp = None, None
    try:
        url = args.url
        if url is None:
            tmp = tempfile.TemporaryDirectory()
            model = args.model or build_model(Path(tmp.name))
            proc, url = start_server(model, max(levels), args.threads)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("HERD_API_KEY", "none"),
                                    timeout=args.max_seconds + 60, max_retries=0)
        name = await wait_ready(client)
        await one_request(client, name, 4)  # warm-up
        rows = []
        for c in levels:
            row = await level(client, name, c, args.requests_per_stream, args.max_tokens, args.max_seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
        out = {"url": url, "model": name, "max_tokens": args.max_tokens, "prompt": PROMPT, "levels": rows,
               "cpu_count": os.cpu_count()}
        Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
        plot(rows, Path(args.out + ".png"), f"herd serve, {name}, {args.max_tokens} tokens per request")
        print(f"wrote {args.out}.json and {args.out}.png")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
