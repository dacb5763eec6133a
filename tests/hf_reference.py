"""Small random Llama 4 configs and weights for parity tests against `transformers` (the oracle)."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 250  # <|patch|> in these small vocabularies
VOCAB = 256


def hf_config_dict(*, multimodal: bool, qk_norm=True, llama3_scaling=True, moe_step=1, top_k=1,
                   chunk=8, floor_scale=4, nope_interval=2, num_layers=4, old_rope_format=False) -> dict:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=top_k, interleave_moe_layer_step=moe_step,
        use_qk_norm=qk_norm, attention_chunk_size=chunk, floor_scale=floor_scale, attn_scale=0.5,
        attn_temperature_tuning=True, no_rope_layer_interval=nope_interval, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        no_rope_layers=[int((i + 1) % nope_interval != 0) for i in range(num_layers)],
    )
    if old_rope_format:  # as written by transformers 4.x
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    else:
        text["rope_parameters"] = rope
    if not multimodal:
        return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **text}
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, projector_input_dim=48, projector_output_dim=48, vision_output_dim=48,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "text_config": {"model_type": "llama4_text", **text},
            "vision_config": {"model_type": "llama4_vision_model", **vision},
            "image_token_index": IMAGE_TOKEN, "boi_token_index": 248, "eoi_token_index": 249}


def build_hf_model(config: dict):
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    if config["model_type"] == "llama4":
        cfg = Llama4Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
        cls = Llama4ForConditionalGeneration
    else:
        cfg = Llama4TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
        cls = Llama4ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    randomize_(model)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0):
    """Wide weights (std 0.2) so routers, gates and non-linearities are really exercised; norm
    weights around 1 so that they matter too."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1 + noise if ("norm" in name and "bias" not in name) else noise)


def image_prompt(n_tiles_per_image: list[int], tokens_per_tile: int, text_len: int = 5, seed: int = 0):
    """Token ids with text between images, each image's tiles as runs of <|patch|>."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for n in n_tiles_per_image:
        ids += torch.randint(3, 200, (text_len,), generator=g).tolist()
        for _ in range(n):
            ids += [IMAGE_TOKEN] * tokens_per_tile + [247]
    ids += torch.randint(3, 200, (text_len,), generator=g).tolist()
    return torch.tensor([ids])
