"""What the herd-against-transformers benchmarks share: the config of the model issue, the
`transformers` twin of a herd model, and the --steps/--threads flags."""

from __future__ import annotations

import argparse
import tempfile

import torch

import herd
from herd.config import ModelConfig, TextConfig


def benchmark_config(**text_overrides) -> ModelConfig:
    """Hidden 256, 8 layers, 8 heads / 2 KV heads of 32, 8 experts top-1 of width 512, vocab 8192,
    chunk 256."""
    text = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
                attention_chunk_size=256, rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return ModelConfig(text=TextConfig(**(text | text_overrides)), vision=None)


def hf_twin(model):
    """`transformers`' Llama4ForCausalLM holding `model`'s weights (loaded from its checkpoint)."""
    from transformers import Llama4ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        herd.save_pretrained(model, tmp)
        return Llama4ForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")


def throughput_args(doc: str, steps: int) -> argparse.Namespace:
    """--steps and --threads, with the thread count applied."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
