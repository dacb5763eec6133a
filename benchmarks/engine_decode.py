"""Decode speed of a loaded checkpoint through the engine: `generate` on the model as trained
(`herd.from_pretrained`) against the model as `herd generate/chat` load it
(`herd.inference.session.load_model_and_tokenizer`: prepared for decoding), and the engine's
aggregate output tokens/s with 1 and 8 concurrent greedy requests. One run, interleaved rounds,
best of `--repeats` per row; compare the ratios (CPU timings on a shared machine are noisy).

    python benchmarks/engine_decode.py [--threads 1] [--new 64] [--repeats 3]

Model: benchmarks/common.py's (hidden 256, 8 MoE layers, vocab 8192), random weights, saved
and loaded as a checkpoint; prompt 128 tokens, greedy.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import benchmark_config

import herd
from herd.inference import Engine, Request, SamplingParams, generate_stream
from herd.inference.fast import prepare_for_decoding
from herd.model import Llama4


def generate_tps(model, prompt: torch.Tensor, new: int) -> float:
    """Decode tokens/s of `generate_stream` at batch 1 (prefill and first token excluded)."""
    stream = generate_stream(model, prompt, new, temperature=0.0, stop_token_ids=[])
    next(stream)
    t = time.perf_counter()
    n = sum(1 for _ in stream)
    return n / (time.perf_counter() - t)


def engine_tps(model, prompts: list[list[int]], new: int) -> float:
    """Output tokens/s of the engine with every prompt running at once (prefill included)."""
    engine = Engine(model, max_batch=len(prompts), token_budget=len(prompts) * 129)
    for i, p in enumerate(prompts):
        engine.add(Request(str(i), p, SamplingParams(max_tokens=new, stop_token_ids=())))
    t, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += sum(len(o.token_ids) for o in engine.step())
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        herd.save_pretrained(Llama4(benchmark_config()), path)
        plain = herd.from_pretrained(path).eval()
        loaded = prepare_for_decoding(herd.from_pretrained(path).eval())  # what load_model_and_tokenizer does
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (128,), generator=g).tolist() for _ in range(8)]
    runs = {
        "generate, as trained": lambda: generate_tps(plain, torch.tensor(prompts[:1]), args.new),
        "generate, as loaded for inference": lambda: generate_tps(loaded, torch.tensor(prompts[:1]), args.new),
        "engine, 1 request": lambda: engine_tps(loaded, prompts[:1], args.new),
        "engine, 8 requests": lambda: engine_tps(loaded, prompts, args.new),
    }
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, run in runs.items():
            best[name] = max(best[name], run())
    print(f"{torch.get_num_threads()} threads, prompt 128, {args.new} new tokens, best of {args.repeats + 1} rounds")
    for name, tps in best.items():
        print(f"| {name} | {tps:.1f} tokens/s |")
    print(f"loaded / as trained: {best['generate, as loaded for inference'] / best['generate, as trained']:.2f}x; "
          f"engine 8 / 1 requests: {best['engine, 8 requests'] / best['engine, 1 request']:.2f}x")


if __name__ == "__main__":
    main()
