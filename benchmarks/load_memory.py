"""Peak memory of loading a checkpoint with quantization: herd's streaming load against loading the
full-precision model and quantizing it afterwards (`quantize_`, the road from_pretrained took before).

    python benchmarks/load_memory.py [--gib 3] [--method int4] [--shard-mib 512]

Writes a synthetic multi-shard bf16 checkpoint under /tmp (a wide text-only config, random weights,
herd's own saver), loads it once per road, each in a fresh process, and deletes it. Each process
reports, from /proc/self/status:
- anonymous memory (RssAnon): the process's own memory, which is what quantizing costs. Sampled
  every millisecond, so a spike shorter than that can be missed;
- file-backed memory (RssFile): the pages of the memory-mapped shards that were touched. The kernel
  can drop them under pressure (they are clean page cache), but they count in RSS and in a cgroup;
- the peak of the two together (VmHWM, reset after the imports; exact, kept by the kernel).
All figures are above the process's own baseline after `import herd` (about 150 MiB anonymous).

    python benchmarks/load_memory.py --measure PATH --road streaming|after [--method int4]

is one such process (tests/test_quant_load.py runs it on a small checkpoint); it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20


def _status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakSampler(threading.Thread):
    """Keeps the largest RssAnon and RssFile seen, every `interval` seconds, until stopped."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.stopped = interval, threading.Event()
        self.anon = self.file = 0

    def run(self):
        while not self.stopped.is_set():
            s = _status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()


def measure(path: str, road: str, method: str) -> dict:
    import torch

    from herd.config import read_hf_config
    from herd.hf import from_pretrained
    from herd.model import Llama4
    from herd.quant import quantize_

    # Code both roads load on first use (meta-device kernels, ~70 MiB of Python) and the thread pool
    # come before the baseline.
    with torch.device("meta"):
        quantize_(Llama4(read_hf_config(path)), method)
    torch.ones(2**16).add_(1)
    base = _status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if road == "streaming":
        model = from_pretrained(path, quantize=method)
    else:
        model = quantize_(from_pretrained(path), method)
    seconds = time.perf_counter() - start
    sampler.stop()
    end = _status()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"road": road, "method": method, "seconds": seconds, "model_bytes": model_bytes,
            "peak_anon": max(sampler.anon, end["RssAnon"]) - base["RssAnon"],
            "peak_file": max(sampler.file, end["RssFile"]) - base["RssFile"],
            "peak_total": end["VmHWM"] - base["RssAnon"] - base["RssFile"],
            "end_anon": end["RssAnon"] - base["RssAnon"], "end_file": end["RssFile"] - base["RssFile"],
            "baseline_anon": base["RssAnon"]}


def measure_in_subprocess(path: Path, road: str, method: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--road", road, "--method", method],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_facts(path: Path) -> dict:
    """Bytes of the checkpoint, of its largest shard and of its largest tensor."""
    from safetensors import safe_open

    shards = sorted(path.glob("model*.safetensors"))
    largest_tensor = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                largest_tensor = max(largest_tensor, numel * {"BF16": 2, "F16": 2, "F32": 4}[s.get_dtype()])
    sizes = [s.stat().st_size for s in shards]
    return {"bytes": sum(sizes), "shards": len(shards), "largest_shard": max(sizes), "largest_tensor": largest_tensor}


def wide_config(gib: float):
    """Text only, hidden 2048, 8 experts of width 4096 on every layer (an expert stack of 128M
    weights, 256 MiB in bf16, is the largest tensor), as many layers as make about `gib` GiB."""
    from herd.config import ModelConfig, TextConfig

    layer_params = 8 * 3 * 2048 * 4096 + 3 * 2048 * 4096 + 2 * 2048 * 2048 + 2 * 2048 * 512
    layers = max(1, round((gib * 2**30 / 2 - 2 * 32768 * 2048) / layer_params))
    text = TextConfig(vocab_size=32768, hidden_size=2048, intermediate_size=4096, intermediate_size_mlp=8192,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                      num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
                      attention_chunk_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return ModelConfig(text=text, vision=None)


def write_random_checkpoint(config, path: Path, shard_bytes: int):
    """Random bf16 weights, built on the meta device and filled in place (no fp32 copy), saved by herd."""
    import torch

    import herd
    from herd.model import Llama4

    with torch.device("meta"):
        model = Llama4(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    herd.save_pretrained(model, path, max_shard_size=shard_bytes)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=3.0, help="checkpoint size in bf16")
    parser.add_argument("--shard-mib", type=int, default=512)
    parser.add_argument("--method", default="int4", choices=["int8", "int4", "fp8"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--road", choices=["streaming", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.road, args.method)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="herd-load-memory-", dir="/tmp"))
    try:
        write_random_checkpoint(wide_config(args.gib), tmp, args.shard_mib * MiB)
        facts = checkpoint_facts(tmp)
        after = measure_in_subprocess(tmp, "after", args.method)
        streaming = measure_in_subprocess(tmp, "streaming", args.method)
    finally:
        shutil.rmtree(tmp)
    print(f"checkpoint: {_gib(facts['bytes'])} bf16 in {facts['shards']} shards (largest "
          f"{_gib(facts['largest_shard'])}), largest tensor {_gib(facts['largest_tensor'])}; "
          f"{args.method} model {_gib(streaming['model_bytes'])}")
    print(f"{'road':<34}{'anonymous':>12}{'file pages':>12}{'together':>12}{'load s':>8}")
    for name, r in (("load, then quantize_ (before)", after), ("streaming (from_pretrained)", streaming)):
        print(f"{name:<34}{_gib(r['peak_anon']):>12}{_gib(r['peak_file']):>12}{_gib(r['peak_total']):>12}"
              f"{r['seconds']:>8.1f}")
    bound = streaming["model_bytes"] + facts["largest_tensor"]
    print(f"streaming anonymous peak = model + {_gib(streaming['peak_anon'] - streaming['model_bytes'])} "
          f"(bound: model + largest tensor = {_gib(bound)}); "
          f"before/streaming: anonymous {after['peak_anon'] / streaming['peak_anon']:.2f}x, "
          f"together {after['peak_total'] / streaming['peak_total']:.2f}x")


if __name__ == "__main__":
    main()
