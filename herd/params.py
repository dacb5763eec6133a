"""Parameter counts and deployment sizes, computed on the meta device (no memory), and
`herd params PRESET [--deploy FORMAT --context N]`.

"Active" follows the model card: the text tower as one token sees it (embedding, lm_head, every
attention and dense layer, the router, the shared expert and top-k of the routed experts); the
vision tower and projector are excluded. "Total" is every parameter, vision included.

A deployment is the model as a GPU holds it and its KV cache at a context length. Both come from
the code that allocates them, run on the meta device: `quantize_` for the weights (int4 layers in
the CUDA kernel's form, herd.quant.cuda_kernels, whose scales are bf16), `StaticKVCache` for the
cache (bf16; rings on chunked layers, full buffers on global ones, against a cache that keeps every
token in every layer). Full-precision weights are bf16. Activations, the CUDA context and the
allocator's slack are not counted: leave a few GiB.
"""

from __future__ import annotations

import json

import torch

from .config import ModelConfig
from .model import Llama4
from .presets import PRESETS, get_preset

GiB = 2**30
DEPLOY_FORMATS = ("bf16", "int8", "int4", "fp8")


def count_parameters(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Llama4(config)
    total = sum(p.numel() for p in model.parameters())
    text = total - sum(p.numel() for m in (model.vision, model.projector) if m is not None for p in m.parameters())
    k, E = config.text.num_experts_per_tok, config.text.num_local_experts
    idle_experts = sum(p.numel() * (E - k) // E for layer in model.layers if layer.is_moe
                       for p in layer.feed_forward.experts.parameters())
    return {"total": total, "active": text - idle_experts}


def _gpu_bytes(module: torch.nn.Module) -> int:
    """Bytes a CUDA device holds for one module's own tensors: an int4 layer's kernel form where
    tinygemm takes its shape (the saved form then waits in host memory), else its tensors."""
    from .quant.cuda_kernels import int4_operands, int4_takes
    from .quant.int4 import Int4Weight

    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if isinstance(module, Int4Weight) and int4_takes(module.qweight.shape[-2], 2 * module.qweight.shape[-1],
                                                     module.group_size):
        own = int4_operands(module.qweight, module.scale, module.zero)
    return sum(t.numel() * t.element_size() for t in own)


def deployment(config: ModelConfig, method: str, context: int, batch: int = 1) -> dict[str, int]:
    """Bytes of a deployment (see the module docstring): `weights` on the GPU, `checkpoint` (herd's
    saved format), `kv_bounded` (herd's cache) and `kv_unbounded`, for `batch` sequences of `context`
    tokens."""
    from .inference.cache import StaticKVCache
    from .quant import quantize_

    if method not in DEPLOY_FORMATS:
        raise ValueError(f"deploy: unknown format {method!r}; choose one of {', '.join(DEPLOY_FORMATS)}")
    with torch.device("meta"):
        model = Llama4(config).to(torch.bfloat16)
        if method != "bf16":
            quantize_(model, method)
    cache = StaticKVCache(config.text, batch, context, dtype=torch.bfloat16, device="meta")
    return {"weights": sum(_gpu_bytes(m) for m in model.modules()),
            "checkpoint": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "kv_bounded": cache.nbytes(), "kv_unbounded": cache.unbounded_nbytes()}


def _short(n: int) -> str:
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _print_deployment(args, d: dict[str, int]):
    t = get_preset(args.preset).text
    memory = args.gpus * args.gpu_memory * GiB
    where = f"{args.gpu_memory:g} GiB" + (f" x {args.gpus} GPUs" if args.gpus > 1 else " on one GPU")
    chunked = sum(t.uses_rope(i) for i in range(t.num_hidden_layers))
    ring = min(t.attention_chunk_size, args.context)
    rows = [("weights on the GPU", d["weights"], f"herd's checkpoint: {_gib(d['checkpoint'])}"),
            ("KV cache, bounded", d["kv_bounded"], f"{chunked} chunked layers keep rings of {ring:,} slots, "
                                                   f"{t.num_hidden_layers - chunked} global layers every token"),
            ("KV cache, unbounded", d["kv_unbounded"], "every layer keeps every token")]
    for name, kv in (("bounded", d["kv_bounded"]), ("unbounded", d["kv_unbounded"])):
        total = d["weights"] + kv
        rows.append((f"total, {name} cache", total, f"fits, {_gib(memory - total)} left for activations"
                     if total <= memory else f"does not fit, {_gib(total - memory)} over"))
    print(f"{args.preset} in {args.deploy}, {args.batch} x {args.context:,} tokens, against {where}:")
    for label, n, note in rows:
        print(f"  {label:<23}{_gib(n):>10}   {note}")


def _run(args) -> int:
    if args.deploy:
        if args.context < 1 or args.batch < 1 or args.gpus < 1 or args.gpu_memory <= 0:
            raise ValueError("--context, --batch, --gpus and --gpu-memory must be positive")
        d = deployment(get_preset(args.preset), args.deploy, args.context, args.batch)
        if args.json:
            memory = args.gpus * args.gpu_memory * GiB
            print(json.dumps(d | {"gpu_memory": int(memory), "fits": d["weights"] + d["kv_bounded"] <= memory,
                                  "fits_unbounded": d["weights"] + d["kv_unbounded"] <= memory}))
        else:
            _print_deployment(args, d)
        return 0
    counts = count_parameters(get_preset(args.preset))
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"{args.preset}: {counts['total']:,} parameters in total ({_short(counts['total'])}), "
              f"{counts['active']:,} active per token ({_short(counts['active'])})")
    return 0


def add_parser(sub):
    p = sub.add_parser("params", help="print a preset's parameter counts, or what a deployment of it needs")
    p.add_argument("preset", choices=list(PRESETS))
    p.add_argument("--json", action="store_true", help='print {"total": N, "active": N} (or the deployment\'s bytes)')
    p.add_argument("--deploy", choices=DEPLOY_FORMATS,
                   help="print the GPU memory of the weights in this format and of the KV cache, and whether they fit")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence in the KV cache (with --deploy)")
    p.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (with --deploy)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (with --deploy; default 80)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the model is split over (with --deploy)")
    p.set_defaults(func=_run)
