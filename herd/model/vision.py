"""The vision tower (SPEC 3): a MetaCLIP-style ViT encoder with 2D RoPE, then a 2x2 pixel shuffle
and a two-layer GELU adapter. Input: tiles [N, C, S, S]; output: [N, tokens_per_tile, adapter width].
The projector into the text width and the fusion into the token stream live in `llama4.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .rope import apply_rope, vision_angles

LAYERNORM_EPS = 1e-5  # the reference's LayerNorms all use the PyTorch default


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, L, D = x.shape
        q = apply_rope(self.q_proj(x).view(N, L, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.k_proj(x).view(N, L, self.n_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(N, L, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(N, L, D))  # bidirectional: no mask


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionAdapter(nn.Module):
    """Linear, GELU, linear, GELU: the second GELU is no typo, the reference has both."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(4 * cfg.hidden_size, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_input_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x):
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, S, S] -> [N, P, C*patch*patch], patches row-major, channel-major inside a patch
    (the layout of a conv with kernel = stride = patch)."""
    N, C, S, _ = pixels.shape
    g = S // patch
    x = pixels.view(N, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)  # [N, gy, gx, C, py, px]
    return x.reshape(N, g * g, C * patch * patch)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """[N, g*g, W] -> [N, (g/2)^2, 4W]: output token (r, c) concatenates patches (2r, 2c),
    (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)."""
    N, P, W = x.shape
    g = int(round(P**0.5))
    x = x.view(N, g // 2, 2, g // 2, 2, W).permute(0, 1, 3, 2, 4, 5)  # [N, r, c, dy, dx, W]
    return x.reshape(N, (g // 2) ** 2, 4 * W)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.hidden_size, cfg.patches_per_side**2
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, D, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(P + 1, D))
        self.layernorm_pre = nn.LayerNorm(D, eps=LAYERNORM_EPS)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm_post = nn.LayerNorm(D, eps=LAYERNORM_EPS)
        self.adapter = VisionAdapter(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be [N_tiles, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] for "
                f"this model's vision config, got {list(pixel_values.shape)}; tile images with herd's "
                "image processor")
        x = self.patch_embedding(patchify(pixel_values.to(self.patch_embedding.weight.dtype), cfg.patch_size))
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # class token LAST: [N, P+1, D]
        x = self.layernorm_pre(x)
        rope = vision_angles(cfg.patches_per_side, cfg.hidden_size // cfg.num_attention_heads,
                             cfg.rope_theta, device=x.device)
        for layer in self.layers:
            x = layer(x, rope)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        return self.adapter(pixel_shuffle(x))  # [N, tokens_per_tile, projector_output_dim]
