"""The tiny multimodal Llama 4 and tokenizer that the inference, serving and post-training tests share:
two layers, two experts, chunked attention of 16 tokens, a one-layer vision tower on 32-pixel tiles."""

import torch

from herd.config import ModelConfig, TextConfig, VisionConfig
from herd.data.corpora import stdlib_texts
from herd.model import Llama4
from herd.tokenizer import Tokenizer, train_tokenizer


def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=100_000)], num_bpe_ranks=300)


def tiny_config(tok: Tokenizer, hidden_size: int = 64) -> ModelConfig:
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size,
                      intermediate_size_mlp=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_local_experts=2, attention_chunk_size=16,
                      max_position_embeddings=2048, bos_token_id=tok.bos_id, eos_token_id=tok.eot_id,
                      pad_token_id=tok.pad_id)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=128, projector_input_dim=48, projector_output_dim=48, vision_output_dim=48)
    return ModelConfig(text=text, vision=vision, image_token_index=tok.patch_id,
                       boi_token_index=tok.image_start_id, eoi_token_index=tok.image_end_id)


def tiny_model(tok: Tokenizer, hidden_size: int = 64, seed: int = 0) -> Llama4:
    torch.manual_seed(seed)
    return Llama4(tiny_config(tok, hidden_size))
