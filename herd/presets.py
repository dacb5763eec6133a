"""Named model presets: `tiny` for a laptop CPU, and the published Llama 4 shapes.

Scout and Maverick reproduce the released checkpoints' shapes (their parameter counts are tested to
the parameter). Behemoth was never released: see its docstring for which numbers are assumptions.
"""

from __future__ import annotations

from .config import ModelConfig, RopeScaling, TextConfig, VisionConfig
from .special_tokens import LLAMA4_NUM_BPE_RANKS, special_id

# herd's own tokenizers for small models: 7,936 BPE ranks + 256 special slots = 8,192 ids.
TINY_BPE_RANKS = 7936
TINY_SPECIAL_SLOTS = 256


def _ids(first_special: int) -> dict:
    return dict(bos_token_id=special_id("<|begin_of_text|>", first_special),
                eos_token_id=special_id("<|end_of_text|>", first_special),
                pad_token_id=special_id("<|finetune_right_pad|>", first_special))


def _image_ids(first_special: int) -> dict:
    return dict(image_token_index=special_id("<|patch|>", first_special),
                boi_token_index=special_id("<|image_start|>", first_special),
                eoi_token_index=special_id("<|image_end|>", first_special))


def tiny() -> ModelConfig:
    """A few million parameters with every Llama 4 feature switched on: RoPE and NoPE layers
    (layer 3 is NoPE), chunked attention with a chunk (64) shorter than the training context,
    QK-norm, dense and MoE layers (MoE at 1 and 3) with a shared expert, and a vision tower that
    reads 64x64 tiles as 8x8 patches (16 image tokens per tile)."""
    text = TextConfig(
        vocab_size=TINY_BPE_RANKS + TINY_SPECIAL_SLOTS, hidden_size=128, intermediate_size=256,
        intermediate_size_mlp=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, rope_theta=10000.0, attention_chunk_size=64, floor_scale=64,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        max_position_embeddings=4096, **_ids(TINY_BPE_RANKS))
    vision = VisionConfig(
        image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, projector_input_dim=128, projector_output_dim=128, vision_output_dim=128)
    return ModelConfig(text=text, vision=vision, **_image_ids(TINY_BPE_RANKS))


def _llama4_text(**overrides) -> TextConfig:
    base = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                rope_theta=500000.0, attention_chunk_size=8192, **_ids(LLAMA4_NUM_BPE_RANKS))
    return TextConfig(**(base | overrides))


def scout() -> ModelConfig:
    """Llama 4 Scout 17B-16E: 16 routed experts top-1 on every layer, QK-norm, Llama-3 RoPE
    scaling (factor 16, original context 8192), trained at 256K context."""
    text = _llama4_text(
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=10485760)
    return ModelConfig(text=text, vision=VisionConfig(), **_image_ids(LLAMA4_NUM_BPE_RANKS))


def maverick() -> ModelConfig:
    """Llama 4 Maverick 17B-128E: 128 routed experts top-1 on odd layers, dense even layers,
    no QK-norm, no RoPE scaling."""
    text = _llama4_text(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                        max_position_embeddings=1048576)
    return ModelConfig(text=text, vision=VisionConfig(), **_image_ids(LLAMA4_NUM_BPE_RANKS))


def behemoth() -> ModelConfig:
    """Llama 4 Behemoth (unreleased; ~288B active, 16 experts, ~2T total).

    Published: 16 routed experts, top-1, a shared expert, ~288B active and ~2T total parameters,
    the Llama 4 vocabulary and vision tower. Assumed here (no public shape exists): hidden size
    16384, 74 layers all MoE, 128 query heads and 8 KV heads of dim 128, expert and shared-expert
    width 32768, QK-norm and RoPE settings as Scout without scaling. These give 287.2B active and
    2.08T total (see `herd params behemoth`)."""
    text = _llama4_text(hidden_size=16384, num_hidden_layers=74, num_attention_heads=128,
                        num_key_value_heads=8, intermediate_size=32768, intermediate_size_mlp=65536,
                        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True)
    return ModelConfig(text=text, vision=VisionConfig(), **_image_ids(LLAMA4_NUM_BPE_RANKS))


PRESETS = {"tiny": tiny, "scout": scout, "maverick": maverick, "behemoth": behemoth}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
