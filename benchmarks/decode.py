"""Decode speed on CPU: herd against transformers, the memory-bandwidth roofline, batching and
weight-only quantization, all measured in one run (CPU timings on a shared machine are noisy:
compare the ratios, which come from the same run).

    python benchmarks/decode.py [--threads 1] [--new 128] [--skip-hf] [--skip-compile]

Model: hidden 256, 8 layers (all MoE, 8 experts top-1, width 512), 8 heads / 2 KV heads of 32,
vocab 8192, chunk 256, random weights. Prompt 128 tokens, 128 new tokens, greedy. Decode speed
counts the 127 steps after the first token (prefill excluded) and takes the best of `--repeats`.

One thread by default: a batch-1 GEMV runs on one thread in PyTorch's CPU BLAS anyway, and on a
machine shared with other jobs a second OpenMP thread that loses its core stalls every op (we saw
100x slowdowns). The roofline uses the read bandwidth measured with the same thread count.

herd's rows decode with the model prepared by `herd.inference.prepare_for_decoding` (fused
projections, [in, out] weights, the few-token MoE; what `herd generate/chat` use) unless the row
says "as trained" (the model's own modules, the slow twin).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from herd.config import ModelConfig, TextConfig
from herd.inference import generate_stream, prepare_for_decoding
from herd.model import Llama4
from herd.train.metrics import measure_matmul_peak


def bench_config() -> ModelConfig:
    text = TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
                      attention_chunk_size=256, rope_theta=10000.0, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return ModelConfig(text=text, vision=None)


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


def herd_decode(model: Llama4, prompt: torch.Tensor, new: int, repeats: int, compile: bool = False) -> float:
    """Decode tokens/s (all rows together), prefill excluded; with `compile`, one untimed run first
    compiles the step."""
    best = float("inf")
    for _ in range(repeats + compile):
        stream = generate_stream(model, prompt, new, temperature=0.0, stop_token_ids=[], compile=compile)
        next(stream)  # prefill + first token
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        best = min(best, (time.perf_counter() - t) / n)
    return prompt.shape[0] / best


def hf_decode(hf, prompt: torch.Tensor, new: int, repeats: int) -> float:
    def run(n):
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    best = float("inf")
    for _ in range(repeats):
        best = min(best, (run(new) - run(1)) / (new - 1))
    return prompt.shape[0] / best


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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Llama4(bench_config()).eval()
    prompt = torch.randint(3, 8000, (1, args.prompt))
    batch = torch.randint(3, 8000, (args.batch, args.prompt))
    print(f"torch {torch.__version__}, {args.threads} threads; prompt {args.prompt}, {args.new} new tokens")

    rows = []
    bw = read_bandwidth()
    active = active_weight_bytes(model)
    plain = herd_decode(model, prompt, args.new, args.repeats)
    fast_model = prepare_for_decoding(copy_of(model))
    fp32 = herd_decode(fast_model, prompt, args.new, args.repeats)
    rows.append(("herd fp32, batch 1", fp32, f"{fp32 / (bw / active):.0%} of roofline"))
    rows.append(("herd fp32, batch 1, as trained", plain, f"prepared is {fp32 / plain:.2f}x faster"))
    if not args.skip_compile:
        t = time.perf_counter()
        compiled = herd_decode(fast_model, prompt, args.new, args.repeats, compile=True)
        rows.append(("herd fp32, batch 1, compiled step", compiled,
                     f"{compiled / fp32:.2f}x prepared; {compiled / (bw / active):.0%} of roofline; "
                     f"compile + runs {time.perf_counter() - t:.0f} s"))

    if not args.skip_hf:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = transformers.Llama4ForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        with torch.no_grad():
            theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        ours = fast_model.generate(prompt, 16, temperature=0.0, stop_token_ids=[])
        hf_tps = hf_decode(hf, prompt, args.new, args.repeats)
        compiled_note = "" if args.skip_compile else f", compiled {compiled / hf_tps:.1f}x"
        rows.append((f"transformers {transformers.__version__} fp32, batch 1", hf_tps,
                     f"herd {fp32 / hf_tps:.1f}x faster{compiled_note}; same greedy tokens: {torch.equal(ours, theirs)}"))
        del hf

    b16 = herd_decode(fast_model, batch, args.new, args.repeats)
    # Batching is free only while a step is bound by reading weights. Here 16 rows reach most of the
    # 8 experts, and their matmuls (2 FLOPs per active weight per row) have a floor set by the
    # machine's matmul peak measured with the same threads.
    peak = measure_matmul_peak(size=1024, repeats=10)
    at_peak = peak / (2 * active / 4)  # aggregate tokens/s if every FLOP ran at peak (fp32 weights)
    compiled_note = "" if args.skip_compile else f", {b16 / compiled:.1f}x compiled batch 1"
    rows.append((f"herd fp32, batch {args.batch} (aggregate)", b16,
                 f"{b16 / fp32:.1f}x batch 1{compiled_note}; matmuls at peak ({peak / 1e9:.0f} GFLOP/s) "
                 f"would give {at_peak:.0f}"))

    from herd.quant import quantize_

    for method in ("int8", "int4"):
        q = prepare_for_decoding(quantize_(copy_of(model), method))
        tps = herd_decode(q, prompt, args.new, args.repeats)
        q_bytes = active_weight_bytes(q)
        rows.append((f"herd {method}, batch 1", tps,
                     f"{tps / fp32:.2f}x fp32; {q_bytes / 2**20:.1f} MiB read/token, "
                     f"{tps / (bw / q_bytes):.0%} of its roofline"))
        if not args.skip_compile:
            tps = herd_decode(q, prompt, args.new, args.repeats, compile=True)
            rows.append((f"herd {method}, batch 1, compiled step", tps,
                         f"{tps / compiled:.2f}x fp32 compiled; {tps / (bw / q_bytes):.0%} of its roofline"))

    print(f"read bandwidth {bw / 1e9:.1f} GB/s; fp32 active weights {active / 2**20:.1f} MiB/token "
          f"-> roofline {bw / active:.0f} tokens/s")
    print(f"| {'setting':<40} | {'decode tok/s':>12} | note")
    print(f"|{'-' * 42}|{'-' * 14}|------")
    for name, tps, note in rows:
        print(f"| {name:<40} | {tps:12.1f} | {note}")


if __name__ == "__main__":
    main()
