"""Load test of `herd serve`: streams at concurrency 1, 4, 16 and 64 on 127.0.0.1.

    python benchmarks/serve_load.py [--model DIR] [--url http://127.0.0.1:PORT] [--max-tokens 32]
                                    [--requests-per-stream 2] [--max-seconds 120] [--threads N] [--out serve_load]
                                    [--llamacpp [--llama-server PATH] [--rounds 2]]

Without --url it starts `herd serve` itself (--max-batch 64) on a free port: on --model, or on a
random-weight model of benchmarks/common.py's shape (hidden 256, 8 MoE layers) with a small tokenizer
trained here. Every request is a streamed completion of the same prompt that cannot stop early
(`ignore_eos` for herd, a -100 logit bias on the stop tokens for llama.cpp), so each produces
exactly --max-tokens tokens. At concurrency c, c client tasks each send --requests-per-stream
requests one after another (after --max-seconds a level starts no new request).

--llamacpp compares with llama.cpp's server as llama-cpp-python ships it (`python -m
llama_cpp.server`, pip install "herd[llamacpp]") on the same model exported by `herd gguf`: four
servers run side by side, herd fp32, llama.cpp f32, herd int8 and llama.cpp Q8_0, each with
--threads threads, and every level runs on each of them in turn (A, B, A', B'), --rounds times, so
the ratios come from the same minutes of a shared machine. llama-cpp-python's server holds one
llama.cpp context behind a lock: it serves requests one at a time, whatever the concurrency.
--llama-server PATH adds llama.cpp's own C++ server (built from llama.cpp's sources; not part of
llama-cpp-python) on the same two files, with as many parallel slots as herd's --max-batch.

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

from dataclasses import dataclass, field

import numpy as np

PROMPT = "def quicksort(items):\n    "


@dataclass
class Server:
    name: str
    url: str
    extra_body: dict  # what makes a request produce exactly max_tokens tokens on this server
    proc: subprocess.Popen | None = None
    model: str = ""
    rows: list = field(default_factory=list)


def build_model(directory: Path) -> Path:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import benchmark_config

    import herd
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_herd(name: str, model: Path, max_batch: int, threads: int | None, quantize: str | None = None) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-waiting", "256",
                             *(["--threads", str(threads)] if threads else []),
                             *(["--quantize", quantize] if quantize else [])],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    return Server(name, f"http://127.0.0.1:{port}", {"ignore_eos": True}, proc)


def start_llamacpp(name: str, gguf: Path, threads: int, stop_ids: list[int]) -> Server:
    """llama-cpp-python's server on 127.0.0.1. interrupt_requests=False: by default a new request
    cuts the running stream short, which would turn a load test into a stream of truncations."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--n_ctx", "2048", "--interrupt_requests", "False", "--verbose", "False"],
                            stdout=subprocess.DEVNULL)
    return Server(name, f"http://127.0.0.1:{port}", {"logit_bias": {str(t): -100.0 for t in stop_ids}}, proc)


def start_llama_server(name: str, binary: Path, gguf: Path, threads: int, slots: int) -> Server:
    """llama.cpp's C++ server: continuous batching over `slots` parallel sequences of 256 tokens each."""
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(slots),
                             "--ctx-size", str(256 * slots)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(name, f"http://127.0.0.1:{port}", {"ignore_eos": True}, proc)


async def wait_ready(client, timeout: float = 120.0) -> str:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await client.models.list()).data[0].id
        except (openai.APIConnectionError, openai.InternalServerError):  # not listening yet, or loading (503)
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up") from None
            await asyncio.sleep(0.2)


async def one_request(client, server: Server, max_tokens: int) -> dict:
    sent = time.perf_counter()
    last, ttft, gaps, tokens, finish = sent, None, [], None, None
    stream = await client.completions.create(model=server.model, prompt=PROMPT, max_tokens=max_tokens,
                                             temperature=0.0, stream=True, stream_options={"include_usage": True},
                                             extra_body=server.extra_body)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:  # one chunk per engine output, even while its text is held back
            finish = chunk.choices[0].finish_reason or finish
            if ttft is None:
                ttft = now - sent
            else:
                gaps.append(now - last)
            last = now
    if tokens is None:  # llama-cpp-python sends no usage when streaming; stops are banned, so "length" is all
        if finish != "length":
            raise RuntimeError(f"the stream ended with finish_reason {finish!r}, not 'length'")
        tokens = max_tokens
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens}


async def level(client, server: Server, concurrency: int, per_stream: int, max_tokens: int,
                max_seconds: float) -> dict:
    results, errors = [], []
    start = time.perf_counter()

    async def stream_task():
        for _ in range(per_stream):
            if time.perf_counter() - start > max_seconds:
                return
            try:
                results.append(await one_request(client, server, max_tokens))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:200])

    load_before = os.getloadavg()[0]
    await asyncio.gather(*(stream_task() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "tokens": tokens, "requests_per_s": len(results) / wall,
            "output_tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99),
            "load_average": (load_before + os.getloadavg()[0]) / 2}


def combine(rounds: list[dict]) -> dict:
    """One level's rounds on one server: throughput over all of them, latencies as the rounds' median."""
    out = {"concurrency": rounds[0]["concurrency"], "rounds": len(rounds),
           "errors": sum(r["errors"] for r in rounds), "requests": sum(r["requests"] for r in rounds),
           "error_samples": [e for r in rounds for e in r["error_samples"]][:3]}
    wall = sum(r["wall_s"] for r in rounds)
    out["requests_per_s"] = out["requests"] / wall
    out["output_tokens_per_s"] = sum(r["tokens"] for r in rounds) / wall
    out["round_tokens_per_s"] = [r["output_tokens_per_s"] for r in rounds]
    for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "load_average"):
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = float(np.median(values)) if values else None
    return out


# herd's server and llama.cpp's on the same weight format
PEERS = (("herd fp32", "llama.cpp f32"), ("herd int8", "llama.cpp q8_0"), ("herd fp32", "llama-server f32"),
         ("herd int8", "llama-server q8_0"))


def table(servers: list[Server]) -> str:
    """Markdown: tokens/s per server and level, and herd / llama.cpp for each weight format."""
    by_name = {s.name: s for s in servers}
    pairs = [(by_name[a], by_name[b]) for a, b in PEERS if a in by_name and b in by_name]
    head = ["streams"] + [f"{s.name} tok/s" for s in servers] + [f"{a.name} / {b.name}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(servers[0].rows):
        cells = [str(row["concurrency"])]
        cells += [f"{s.rows[i]['output_tokens_per_s']:.1f}" + (f" ({s.rows[i]['errors']} errors)" if s.rows[i]["errors"]
                                                              else "") for s in servers]
        for a, b in pairs:
            per_round = [x / y for x, y in zip(a.rows[i]["round_tokens_per_s"], b.rows[i]["round_tokens_per_s"])]
            spread = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            cells.append(f"{a.rows[i]['output_tokens_per_s'] / b.rows[i]['output_tokens_per_s']:.2f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(servers: list[Server], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, server in enumerate(servers):
        rows = server.rows
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["output_tokens_per_s"] for r in rows], "o-", color=f"C{i}", label=server.name)
        for key, style in (("ttft_p50_s", "o-"), ("itl_p50_s", "s--")):
            b.plot(c, [r[key] * 1000 if r[key] is not None else np.nan for r in rows], style, color=f"C{i}",
                   label=f"{server.name} {key[:-6]} p50")
    a.set(xscale="log", xticks=c, xticklabels=c, xlabel="concurrent streams", ylabel="output tokens/s",
          title="aggregate throughput")
    b.set(xscale="log", yscale="log", xticks=c, xticklabels=c, xlabel="concurrent streams", ylabel="ms",
          title="latency (p50)")
    for axis in (a, b):
        axis.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_description() -> str:
    """CPU model and the vector extensions the kernels can use (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = sorted(f for f in set(flags) if f.startswith(("avx", "fma", "f16c")) or f in ("amx_int8", "amx_bf16"))
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(vector)}"


def export_ggufs(model: Path, directory: Path) -> dict[str, Path]:
    from herd.export.gguf import export_gguf

    return {t: export_gguf(model, directory / f"model-{t}.gguf", t)["path"] for t in ("f32", "q8_0")}


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint to serve (default: a random benchmark-shaped model)")
    p.add_argument("--url", help="an already running server (no server is started)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per level")
    p.add_argument("--threads", type=int, help="each server's CPU threads (herd serve --threads; llama.cpp "
                   "--n_threads and --n_threads_batch; default with --llamacpp: 1)")
    p.add_argument("--llamacpp", action="store_true", help="also llama.cpp's server on the model as GGUF (f32, "
                   "Q8_0) beside herd fp32 and int8, interleaved")
    p.add_argument("--llama-server", type=Path, help="with --llamacpp: also this llama.cpp llama-server binary")
    p.add_argument("--rounds", type=int, default=2, help="with --llamacpp: passes over the servers per level")
    p.add_argument("--out", default="serve_load")
    args = p.parse_args()
    import openai

    if args.llamacpp and args.url:
        p.error("--llamacpp starts its own servers; it does not take --url")
    if args.llama_server and not args.llamacpp:
        p.error("--llama-server goes with --llamacpp")
    levels = [int(c) for c in args.concurrency.split(",")]
    rounds = args.rounds if args.llamacpp else 1
    servers: list[Server] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        if args.url:
            servers.append(Server("herd", args.url, {"ignore_eos": True}))
        else:
            model = args.model or build_model(Path(tmp.name) / "model")
            if args.llamacpp:
                from herd.tokenizer import Tokenizer

                threads = args.threads or 1
                ggufs = export_ggufs(model, Path(tmp.name))
                stops = list(Tokenizer.from_dir(model).stop_ids)
                for precision, kind in (("fp32", "f32"), ("int8", "q8_0")):
                    servers += [start_herd(f"herd {precision}", model, max(levels), threads,
                                           None if precision == "fp32" else precision),
                                start_llamacpp(f"llama.cpp {kind}", ggufs[kind], threads, stops)]
                    if args.llama_server:
                        servers.append(start_llama_server(f"llama-server {kind}", args.llama_server, ggufs[kind],
                                                          threads, max(levels)))
            else:
                servers.append(start_herd("herd", model, max(levels), args.threads))
        clients = {}
        for server in servers:
            clients[server.name] = openai.AsyncOpenAI(base_url=server.url + "/v1", timeout=args.max_seconds + 60,
                                                      api_key=os.environ.get("HERD_API_KEY", "none"), max_retries=0)
            server.model = await wait_ready(clients[server.name])
            await one_request(clients[server.name], server, 4)  # warm-up
        started = time.time()
        for c in levels:
            per_server = {s.name: [] for s in servers}
            for _ in range(rounds):
                for server in servers:  # interleaved: A, B, A', B', A, B, ...
                    row = await level(clients[server.name], server, c, args.requests_per_stream, args.max_tokens,
                                      args.max_seconds)
                    per_server[server.name].append(row)
                    print(json.dumps({"server": server.name, **row}), flush=True)
            for server in servers:
                server.rows.append(combine(per_server[server.name]))
        out = {"servers": {s.name: {"url": s.url, "model": s.model, "levels": s.rows} for s in servers},
               "max_tokens": args.max_tokens, "prompt": PROMPT, "rounds": rounds, "threads": args.threads,
               "cpu": cpu_description(), "minutes": (time.time() - started) / 60}
        Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
        names = ", ".join(s.name for s in servers)
        plot(servers, Path(args.out + ".png"), f"{names}: {args.max_tokens} tokens per request")
        print(table(servers))
        print(f"CPU: {out['cpu']}; load average during the levels: "
              f"{min(r['load_average'] for s in servers for r in s.rows):.1f}-"
              f"{max(r['load_average'] for s in servers for r in s.rows):.1f}")
        print(f"wrote {args.out}.json and {args.out}.png")
    finally:
        for server in servers:
            if server.proc is not None:
                server.proc.terminate()
        for server in servers:
            if server.proc is not None:
                server.proc.wait(60)
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
