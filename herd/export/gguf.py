"""A herd checkpoint as one GGUF file for llama.cpp's `llama4` architecture (text model only).

    herd gguf runs/main/model model-f32.gguf [--type f32|q8_0]

Why herd writes GGUF itself: llama.cpp's `convert_hf_to_gguf.py` reads Llama4ForCausalLM
checkpoints, but it identifies a BPE tokenizer's pre-tokenizer by the hash of a test string's ids,
so it refuses every tokenizer it has not seen, herd's included ("BPE pre-tokenizer was not
recognized"). herd's pre-tokenizer is Llama 4's regex, which llama.cpp knows as "llama4"; herd's
tokenizer says so directly.

The mapping (llama.cpp stores a [out, in] weight as ne = {in, out}, so numpy's [out, in] is kept):
- attention and dense SwiGLU weights, norms, router, shared expert: renamed only (no q/k
  permutation: Llama 4 already rotates interleaved pairs, llama.cpp's "normal" RoPE);
- experts: HF's gate_up_proj [E, D, 2I] is split into gate and up and transposed to [E, I, D];
  down_proj [E, I, D] becomes [E, D, I];
- Llama-3 RoPE scaling: a `rope_freqs` tensor of per-frequency divisors (unscaled / scaled).

llama.cpp fixes some Llama 4 settings instead of reading them (src/models/llama4.cpp): a NoPE
layer every 4th layer, chunked attention of 8192 and temperature tuning with floor 8192 and scale
0.1, and q/k norm unless there are 128 experts. A checkpoint whose layer pattern or q/k norm differs
is refused (its logits would differ from the first token), and so is one with fewer than 4 layers
(llama.cpp aborts on it); one whose chunk or temperature settings differ is exported, and
`exact_positions` says for how many positions the logits still agree.

`--type q8_0` stores the matrices herd's int8 quantizes (attention, MLPs, experts, lm_head) as
llama.cpp's Q8_0 (blocks of 32 weights with one fp16 scale; herd's int8 has one scale per row);
the embedding, router and norms stay f32, as in herd's int8 model. A matrix whose input width is
not a multiple of 32 cannot be Q8_0 and stays f32 (listed when it happens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..config import TextConfig

# What llama.cpp's llama4 model assumes (src/models/llama4.cpp, src/llama-hparams.h).
LLAMA_CPP_NOPE_INTERVAL = 4
LLAMA_CPP_CHUNK = 8192
LLAMA_CPP_FLOOR_SCALE = 8192
LLAMA_CPP_ATTN_SCALE = 0.1
Q8_0_BLOCK = 32

# herd's per-layer parameter name -> GGUF tensor name ({bid}: the layer)
LAYER_TENSORS = {
    "input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "feed_forward.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "feed_forward.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "feed_forward.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "feed_forward.router.weight": "blk.{bid}.ffn_gate_inp.weight",
    "feed_forward.shared_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
    "feed_forward.shared_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    "feed_forward.shared_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
}
# Full precision in a q8_0 file too: as in herd's int8 model.
KEEP_F32 = ("token_embd.weight", "ffn_gate_inp.weight", "norm.weight", "rope_freqs.weight")

TENSOR_TYPES = ("f32", "q8_0")


def check_exportable(text: TextConfig) -> None:
    """Raises ValueError for a model llama.cpp would run differently from the first token, or not at all."""
    if text.num_hidden_layers < LLAMA_CPP_NOPE_INTERVAL:
        # Its graph always builds the NoPE layers' temperature input; with no NoPE layer to use it,
        # llama.cpp aborts on the first decode ("tensor buffer not set").
        raise ValueError(f"{text.num_hidden_layers} layers: llama.cpp's llama4 needs at least "
                         f"{LLAMA_CPP_NOPE_INTERVAL} (one NoPE layer) and aborts otherwise; this model cannot be "
                         "exported")
    nope = [i for i in range(text.num_hidden_layers) if not text.uses_rope(i)]
    llama_cpp_nope = [i for i in range(text.num_hidden_layers) if (i + 1) % LLAMA_CPP_NOPE_INTERVAL == 0]
    if nope != llama_cpp_nope:
        raise ValueError(f"NoPE layers {nope}: llama.cpp's llama4 makes every {LLAMA_CPP_NOPE_INTERVAL}th layer a "
                         f"NoPE layer ({llama_cpp_nope}) and cannot be told otherwise; this model cannot be exported")
    moe = [i for i in range(text.num_hidden_layers) if text.is_moe(i)]
    step = text.interleave_moe_layer_step
    if moe != [i for i in range(text.num_hidden_layers) if (i + 1) % step == 0]:
        raise ValueError(f"MoE layers {moe} do not follow interleave_moe_layer_step={step}, the only layer "
                         "pattern llama.cpp's llama4 reads; this model cannot be exported")
    if text.use_qk_norm != (text.num_local_experts != 128):
        raise ValueError(f"use_qk_norm={text.use_qk_norm} with {text.num_local_experts} experts: llama.cpp's llama4 "
                         "applies q/k norm exactly when there are not 128 experts; this model cannot be exported")


def exact_positions(text: TextConfig) -> int | None:
    """How many leading positions llama.cpp computes as herd does (None: all of them)."""
    limits = []
    if text.attention_chunk_size != LLAMA_CPP_CHUNK:  # one chunk holds everything below both sizes
        limits.append(min(text.attention_chunk_size, LLAMA_CPP_CHUNK))
    same_temperature = (text.attn_temperature_tuning and text.floor_scale == LLAMA_CPP_FLOOR_SCALE
                        and text.attn_scale == LLAMA_CPP_ATTN_SCALE)
    if not same_temperature:  # both multiply the query by exactly 1 while (p + 1) < floor_scale
        floors = [LLAMA_CPP_FLOOR_SCALE] + ([text.floor_scale] if text.attn_temperature_tuning else [])
        limits.append(min(floors) - 1)
    return min(limits) if limits else None


def _vocabulary(tokenizer_dir: Path) -> tuple[list[str], list[str], set[int]]:
    """Tokens in id order, merges as "a b" strings, and the ids of special tokens, from tokenizer.json."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_dir / 'tokenizer.json'}: a {model.get('type')} tokenizer; the GGUF export "
                         "writes byte-level BPE tokenizers (herd's and Llama 4's)")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special", False):
            special.add(added["id"])
    missing = [i for i in range(max(by_id) + 1) if i not in by_id]
    if missing:
        raise ValueError(f"{tokenizer_dir / 'tokenizer.json'}: token ids {missing[:5]} are unused; GGUF needs ids "
                         "0..N-1 without gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [by_id[i] for i in range(max(by_id) + 1)], merges, special


def _rope_divisors(text: TextConfig) -> np.ndarray | None:
    """llama.cpp's rope_freqs: each frequency is divided by its entry, so unscaled / scaled."""
    if text.rope_scaling is None:
        return None
    from ..model.rope import text_inv_freq

    plain = text_inv_freq(text.head_dim, text.rope_theta, None)
    scaled = text_inv_freq(text.head_dim, text.rope_theta, text.rope_scaling)
    return (plain / scaled).numpy().astype(np.float32)


def _gguf_tensors(model, text: TextConfig):
    """(GGUF name, float32 tensor) for every tensor of the text model, in llama.cpp's layout."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    yield "token_embd.weight", state.pop("embed_tokens.weight")
    yield "output_norm.weight", state.pop("norm.weight")
    yield "output.weight", state.pop("lm_head.weight")
    divisors = _rope_divisors(text)
    if divisors is not None:
        yield "rope_freqs.weight", torch.from_numpy(divisors)
    for i in range(text.num_hidden_layers):
        prefix = f"layers.{i}."
        gate_up = state.pop(prefix + "feed_forward.experts.gate_up_proj", None)
        if gate_up is not None:  # [E, D, 2I]: gate first, then up
            gate, up = gate_up.chunk(2, dim=-1)
            yield f"blk.{i}.ffn_gate_exps.weight", gate.transpose(1, 2)
            yield f"blk.{i}.ffn_up_exps.weight", up.transpose(1, 2)
            yield f"blk.{i}.ffn_down_exps.weight", state.pop(prefix + "feed_forward.experts.down_proj").transpose(1, 2)
        for name in [k for k in state if k.startswith(prefix)]:
            suffix = name[len(prefix):]
            if suffix not in LAYER_TENSORS:
                raise ValueError(f"no GGUF name for herd parameter {name}")
            yield LAYER_TENSORS[suffix].format(bid=i), state.pop(name)
    unmapped = [k for k in state if not k.startswith(("vision.", "projector."))]
    if unmapped:
        raise ValueError(f"no GGUF name for herd parameters {unmapped[:5]}")


def export_gguf(checkpoint: str | Path, out: str | Path, tensor_type: str = "f32",
                tokenizer_dir: str | Path | None = None) -> dict:
    """Writes the checkpoint's text model and tokenizer as a llama.cpp `llama4` GGUF file.

    Returns what was done: the path, the tensor type, the tensors kept in f32 that Q8_0 could not
    hold, and `exact_positions`. A multimodal checkpoint exports its text model (llama.cpp keeps the
    vision encoder in a separate mmproj file, which herd does not write)."""
    try:
        import gguf
    except ImportError:
        raise ValueError('the GGUF export needs the gguf package: pip install "herd[gguf]"') from None
    from ..hf import from_pretrained
    from ..tokenizer import CHAT_TEMPLATE, Tokenizer

    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor type {tensor_type!r} is not one of {', '.join(TENSOR_TYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else checkpoint
    if json.loads((checkpoint / "config.json").read_text()).get("quantization_config"):
        raise ValueError(f"{checkpoint} holds quantized weights; export the full-precision checkpoint "
                         "(--type q8_0 quantizes it for llama.cpp)")
    model = from_pretrained(checkpoint, dtype=torch.float32)
    text = model.config.text
    check_exportable(text)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tokens, merges, special = _vocabulary(tokenizer_dir)
    if len(tokens) != text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {text.vocab_size}")

    quantized = tensor_type == "q8_0"
    writer = gguf.GGUFWriter(str(out), "llama4")
    writer.add_name(checkpoint.resolve().name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size_mlp)  # the dense layers' width
    writer.add_expert_feed_forward_length(text.intermediate_size)  # each expert's, and the shared one's
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_key_length(text.head_dim)
    writer.add_value_length(text.head_dim)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_expert_count(text.num_local_experts)
    writer.add_expert_used_count(text.num_experts_per_tok)
    writer.add_interleave_moe_layer_step(text.interleave_moe_layer_step)
    writer.add_vocab_size(text.vocab_size)

    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("llama4")  # = herd.tokenizer.PRETOKENIZE_PATTERN
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eot_id)  # as herd's tokenizer_config.json: chat replies end with <|eot|>
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_eom_token_id(tokenizer.eom_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)  # as herd's server and tokenizer.json: a text prompt starts with BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    kept_f32 = []
    for name, tensor in _gguf_tensors(model, text):
        array = tensor.contiguous().numpy()
        if quantized and array.ndim >= 2 and not name.endswith(KEEP_F32):
            if array.shape[-1] % Q8_0_BLOCK == 0:
                writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            kept_f32.append(name)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": out, "type": tensor_type, "kept_f32": kept_f32, "exact_positions": exact_positions(text)}


def run(args: argparse.Namespace) -> int:
    result = export_gguf(args.model, args.out, args.type, args.tokenizer)
    print(f"wrote {result['path']} ({result['type']}, llama.cpp architecture llama4, "
          f"{result['path'].stat().st_size / 2**20:.1f} MiB)")
    if result["kept_f32"]:
        print(f"kept in f32 (input width not a multiple of {Q8_0_BLOCK}): {', '.join(result['kept_f32'])}")
    if result["exact_positions"] is not None:
        print(f"note: llama.cpp fixes chunked attention at {LLAMA_CPP_CHUNK} and temperature tuning at floor "
              f"{LLAMA_CPP_FLOOR_SCALE}; for this model its logits equal herd's for the first "
              f"{result['exact_positions']} positions only")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gguf", help="export a checkpoint's text model as GGUF for llama.cpp")
    p.add_argument("model", help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", choices=TENSOR_TYPES, default="f32",
                   help="f32, or q8_0 (llama.cpp's 8-bit blocks) for the matrices herd's int8 quantizes")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model directory)")
    p.set_defaults(func=run)
