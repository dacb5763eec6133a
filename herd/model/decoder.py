"""One pre-norm decoder block: h += attn(norm(h)); h += ffn(norm(h))."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .attention import Attention, KVCache, TokenLayout
from .moe import MoE, RouterStats, SwiGLU
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe(layer)
        self.feed_forward = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout,
                cache: KVCache | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        h = h + self.self_attn(self.input_layernorm(h), rope, layout, cache)
        ffn_out = self.feed_forward(self.post_attention_layernorm(h))
        stats = None
        if self.is_moe:
            ffn_out, stats = ffn_out
        return h + ffn_out, stats
