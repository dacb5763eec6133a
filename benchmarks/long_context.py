"""Long-context prefill and decode on the tiny preset (random weights), at 8K, 32K and 128K tokens.

    python benchmarks/long_context.py [--lengths 8192 32768 131072] [--new 18] [--prefill-chunk 1024] [--threads 1]

Each length runs in its own process so that its peak memory (max RSS, minus the RSS after the model
is built) is its own. Printed per length: prefill and decode tokens/s, the KV cache's bytes, and the
bytes a cache without the chunk bound (every layer keeping every token, as the reference does)
would need. The tiny preset has 4 layers of which one (layer 3) is a global NoPE layer and three
are chunked RoPE layers (chunk 64), so the bounded cache is about 4x smaller; Scout's 48 layers
have the same 3:1 ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(length: int, new: int, prefill_chunk: int) -> dict:
    from herd import get_preset
    from herd.inference import StaticKVCache
    from herd.model import Llama4

    config = get_preset("tiny")
    config.vision = None
    config.text.max_position_embeddings = max(config.text.max_position_embeddings, length + new)
    torch.manual_seed(0)
    model = Llama4(config).eval()
    prompt = torch.randint(0, 7936, (length,))
    base = rss_mib()
    with torch.inference_mode():
        cache = StaticKVCache(config.text, 1, length + new, dtype=model.dtype)
        t = time.perf_counter()
        for a in range(0, length, prefill_chunk):  # the engine's prefill: one piece per call
            piece = cache.piece(0, min(prefill_chunk, length - a))
            h = model.embed_tokens(prompt[None, a:a + prefill_chunk])
            logits = model(inputs_embeds=h, layout=piece.layout, cache=piece, logits_to_keep=1).logits[:, -1]
        t_prefill = time.perf_counter() - t
        tokens = logits.argmax(-1)
        document = torch.zeros(1, dtype=torch.long)
        for step in range(new):
            if step == 2:  # the first steps pay one-time costs
                t = time.perf_counter()
            positions = torch.tensor(cache.lengths)
            view = cache.step(positions, document, end=cache.lengths[0] + 1)
            logits = model(tokens[:, None], layout=view.layout, cache=view, logits_to_keep=1).logits[:, -1]
            cache.lengths[0] += 1
            tokens = logits.argmax(-1)
        t_decode = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(length=length, prefill_tps=length / t_prefill, decode_tps=(new - 2) / t_decode,
                cache_mib=cache.nbytes() / 2**20, unbounded_mib=cache.unbounded_nbytes() / 2**20,
                peak_mib=peak - base)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--new", type=int, default=18)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="1 by default: see benchmarks/decode.py")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one length, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.new, args.prefill_chunk)))
        return
    print(f"tiny preset, random weights, batch 1, fp32, {torch.get_num_threads()} threads, "
          f"prefill pieces of {args.prefill_chunk}, {args.new} decode steps")
    print("| prompt | prefill tok/s | decode tok/s | KV cache | without chunk bound | peak memory (over model) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--one", str(length), "--new", str(args.new),
                              "--prefill-chunk", str(args.prefill_chunk), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {length} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {length // 1024}K | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['cache_mib']:.1f} MiB | "
              f"{r['unbounded_mib']:.1f} MiB | {r['peak_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
