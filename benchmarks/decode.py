"""Decode speed on CPU: herd against transformers, the memory-bandwidth roofline, batching and
weight-only quantization, all measured in one run (CPU timings on a shared machine are noisy:
compare the ratios, which come from the same run).

    python benchmarks/decode.py [--threads 1] [--new 128] [--repeats 5] [--skip-hf] [--skip-compile]

Model: hidden 256, 8 layers (all MoE, 8 experts top-1, width 512), 8 heads / 2 KV heads of 32,
vocab 8192, chunk 256, random weights. Prompt 128 tokens, 128 new tokens, greedy. Decode speed
counts the 127 steps after the first token (prefill excluded). Every setting runs once per round,
after an untimed round that compiles and warms up, and keeps its best of `--repeats` rounds.

One thread by default: a batch-1 GEMV runs on one thread in PyTorch's CPU BLAS anyway, and on a
machine shared with other jobs a second OpenMP thread that loses its core stalls every op (we saw
100x slowdowns). The roofline uses the read bandwidth measured with the same thread count.

herd's rows decode with the model prepared by `herd.inference.prepare_for_decoding` (fused
projections, blocked weights, the few-token MoE; what `herd generate/chat` use), eagerly or, in the
"compiled step" rows, with `generate(..., compile=True)` (`herd generate/chat --compile`), unless the
row says "as trained" (the model's own modules, the slow twin). Compiling the batch-16 int4 step
takes about 3 minutes (its MoE runs each of the 16 (row, expert) pairs separately); --skip-compile
leaves all compiled rows out.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import benchmark_config, hf_twin

from herd.inference import generate, generate_stream, prepare_for_decoding
from herd.model import Llama4
from herd.train.metrics import measure_matmul_peak


def active_weight_bytes(model: Llama4) -> int:
    """Bytes of weights one decoded token reads: attention, router, shared expert, top-k routed
    experts, norms, lm_head and one embedding row."""
    t = model.config.text
    total = 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        nbytes = p.numel() * p.element_size()
        if name.startswith("embed_tokens"):
            nbytes //= t.vocab_size
        elif ".experts." in name:
            nbytes = nbytes * t.num_experts_per_tok // t.num_local_experts
        total += nbytes
    return total


def batch_step_bytes(model: Llama4, batch: torch.Tensor) -> float:
    """Bytes of weights one decoding step of the whole batch reads: what one token reads, plus every
    further expert the batch's tokens are routed to. Counted from the routing of `batch` [B, T]:
    the distinct experts among the B rows at each position, averaged over positions."""
    t = model.config.text
    with torch.no_grad():
        routes = model(batch).router  # one RouterStats per MoE layer
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = expert_bytes / len(routes) / t.num_local_experts
    B, T = batch.shape
    extra = 0.0
    for stats in routes:
        chosen = stats.top_experts.view(B, T, -1).transpose(0, 1).flatten(1)  # [T, B * k]
        distinct = torch.tensor([row.unique().numel() for row in chosen], dtype=torch.float).mean().item()
        extra += (distinct - t.num_experts_per_tok) * per_expert
    return active_weight_bytes(model) + extra


def read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a sum over a tensor much larger than the caches."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def herd_run(model: Llama4, prompt: torch.Tensor, new: int, compile: bool = False):
    """One generation, as a zero-argument callable returning decode tokens/s (all rows together,
    prefill and first token excluded)."""
    def run() -> float:
        stream = generate_stream(model, prompt, new, temperature=0.0, stop_token_ids=[], compile=compile)
        next(stream)  # prefill + first token
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        return prompt.shape[0] * n / (time.perf_counter() - t)

    return run


def hf_run(hf, prompt: torch.Tensor, new: int):
    """transformers' generate: a run of `new` tokens minus a run of 1, so its prefill drops out."""
    def timed(n):
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    return lambda: prompt.shape[0] * (new - 1) / (timed(new) - timed(1))


def best_of_rounds(runs: dict, rounds: int) -> dict:
    """Best tokens/s of each setting over `rounds` rounds, every round running each setting once:
    interleaved, so that a slow spell on a shared machine hits all settings alike and the ratios
    stay fair. An untimed first round compiles and warms up."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def copy_of(model: Llama4) -> Llama4:
    fresh = Llama4(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each row keeps its best")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Llama4(benchmark_config(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                    max_position_embeddings=4096)).eval()
    prompt = torch.randint(3, 8000, (1, args.prompt))
    batch = torch.randint(3, 8000, (args.batch, args.prompt))
    print(f"torch {torch.__version__}, {args.threads} threads; prompt {args.prompt}, {args.new} new tokens")

    from herd.quant import quantize_

    bw = read_bandwidth()
    active = active_weight_bytes(model)
    fast = prepare_for_decoding(copy_of(model))
    quant = {m: prepare_for_decoding(quantize_(copy_of(model), m)) for m in ("int8", "int4")}
    runs = {"as trained": herd_run(model, prompt, args.new), "fp32": herd_run(fast, prompt, args.new),
            "batch": herd_run(fast, batch, args.new)}
    runs |= {m: herd_run(q, prompt, args.new) for m, q in quant.items()}
    if not args.skip_compile:
        runs |= {f"{m} compiled": herd_run(q, prompt, args.new, compile=True)
                 for m, q in (("fp32", fast), *quant.items())}
        runs |= {"batch compiled": herd_run(fast, batch, args.new, compile=True),
                 "int4 batch compiled": herd_run(quant["int4"], batch, args.new, compile=True)}
    if not args.skip_hf:
        import transformers

        hf = hf_twin(model).eval()
        with torch.no_grad():
            same_tokens = torch.equal(generate(fast, prompt, 16, temperature=0.0, stop_token_ids=[]),
                                      hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0))
        runs["transformers"] = hf_run(hf, prompt, args.new)
    t = time.perf_counter()
    best = best_of_rounds(runs, args.repeats)
    seconds = time.perf_counter() - t
    compiled = not args.skip_compile

    def roofline(name, nbytes=active):
        return f"{best[name] / (bw / nbytes):.0%} of {'its' if nbytes != active else 'the'} roofline"

    fp32 = best["fp32"]
    rows = [("herd fp32, batch 1", fp32, roofline("fp32")),
            ("herd fp32, batch 1, as trained", best["as trained"], f"prepared is {fp32 / best['as trained']:.2f}x faster")]
    if compiled:
        rows.append(("herd fp32, batch 1, compiled step", best["fp32 compiled"],
                     f"{best['fp32 compiled'] / fp32:.2f}x eager; {roofline('fp32 compiled')}"))
    if not args.skip_hf:
        hf_tps = best["transformers"]
        note = f"herd {fp32 / hf_tps:.1f}x faster" + (f", compiled {best['fp32 compiled'] / hf_tps:.1f}x" if compiled else "")
        rows.append((f"transformers {transformers.__version__} fp32, batch 1", hf_tps,
                     f"{note}; same greedy tokens: {same_tokens}"))
    # Batching is free only while a step is bound by reading weights, and an MoE step of 16 rows
    # reads more: its rows are routed to most of the experts. Two ceilings for the batch, from this
    # run's measurements: the memory roofline for the bytes the batch's routing reads, and the
    # machine's matmul peak (same threads) for its FLOPs (2 per active weight per row).
    step_bytes = batch_step_bytes(model, batch)
    memory_ceiling = args.batch * bw / step_bytes
    peak = measure_matmul_peak(size=1024, repeats=10)
    compute_ceiling = peak / (2 * active / 4)  # aggregate tokens/s if every FLOP ran at peak (fp32 weights)
    b16 = best["batch"]
    rows.append((f"herd fp32, batch {args.batch} (aggregate)", b16,
                 f"{b16 / fp32:.1f}x batch 1" + (f", {b16 / best['fp32 compiled']:.1f}x compiled batch 1" if compiled else "")
                 + f"; ceilings: reading its {step_bytes / 2**20:.0f} MiB/step {memory_ceiling:.0f} "
                 f"(= {memory_ceiling / (bw / active):.1f}x the batch-1 roofline), matmuls at peak "
                 f"({peak / 1e9:.0f} GFLOP/s) {compute_ceiling:.0f}"))
    def times(a: str, b: str) -> str:
        return f"{best[a] / best[b]:.2f}x"

    if compiled:
        rows.append((f"herd fp32, batch {args.batch}, compiled step", best["batch compiled"],
                     f"{times('batch compiled', 'fp32 compiled')} compiled batch 1; "
                     f"{times('batch compiled', 'batch')} eager batch {args.batch}"))
    for m, q in quant.items():
        q_bytes = active_weight_bytes(q)
        rows.append((f"herd {m}, batch 1", best[m],
                     f"{best[m] / fp32:.2f}x fp32; {q_bytes / 2**20:.1f} MiB read/token, {roofline(m, q_bytes)}"))
        if compiled:
            rows.append((f"herd {m}, batch 1, compiled step", best[f"{m} compiled"],
                         f"{best[f'{m} compiled'] / best['fp32 compiled']:.2f}x fp32 compiled; "
                         f"{roofline(f'{m} compiled', q_bytes)}"))
    if compiled:
        rows.append((f"herd int4, batch {args.batch}, compiled step", best["int4 batch compiled"],
                     f"{times('int4 batch compiled', 'int4 compiled')} int4 compiled batch 1, "
                     f"{times('int4 batch compiled', 'fp32 compiled')} fp32 compiled batch 1"))

    print(f"{len(runs)} settings, best of {args.repeats} interleaved rounds: {seconds:.0f} s")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; fp32 active weights {active / 2**20:.1f} MiB/token "
          f"-> roofline {bw / active:.0f} tokens/s")
    print(f"| {'setting':<40} | {'decode tok/s':>12} | note")
    print(f"|{'-' * 42}|{'-' * 14}|------")
    for name, tps, note in rows:
        print(f"| {name:<40} | {tps:12.1f} | {note}")


if __name__ == "__main__":
    main()
