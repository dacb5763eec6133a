"""Rotary position embeddings: 1D for the text decoder, 2D for the vision encoder.

Llama 4 rotates *interleaved* pairs (x[2j], x[2j+1]) (the complex-number form of the original
RoPE), not the rotate-half layout of Llama 2/3 ports; checkpoints keep q/k rows in this order.
Frequencies are computed on the fly from the config (a few hundred floats), so the model has no
buffers to rebuild after a meta-device construction.
"""

import math

import torch

from ..config import RopeScaling


def text_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[Dh/2] angular frequencies, with Llama-3 scaling of the long wavelengths when configured."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # Between the two wavelengths, interpolate between scaled and unscaled frequencies.
    band = scaling.high_freq_factor - scaling.low_freq_factor
    if band > 0:
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / band
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        scaled = torch.where(in_band, smoothed, scaled)
    return scaled


def text_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, Dh/2] for integer positions [B, T]."""
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    return angles.cos(), angles.sin()


def vision_angles(patches_per_side: int, head_dim: int, theta: float, device=None):
    """cos, sin of shape [P + 1, Dh/2] for a tile's patches followed by the class token.

    The first half of the pairs rotate with the patch column, the second half with its row, both
    counted from 1; the class token (last) is not rotated.
    """
    n = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(n, dtype=torch.float32, device=device) * 2 / (head_dim // 2))
    idx = torch.arange(patches_per_side**2, device=device)
    col, row = (idx % patches_per_side + 1).float(), (idx // patches_per_side + 1).float()
    angles = torch.cat([col[:, None] * freqs, row[:, None] * freqs], dim=-1)  # [P, Dh/2]
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # class token: angle 0
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., T, heads, Dh] by angles [..., T, Dh/2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., T, heads, Dh/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
