"""The Llama 4 network: text decoder (iRoPE attention, MoE), vision tower and early fusion.

Shape legend used across these files:
  B batch, T tokens (query), S keys, D model width, H query heads, K KV heads, Dh head width,
  E routed experts, k experts per token, I expert width, N routed (token, expert) pairs,
  P patches per tile, V vocabulary.
"""

from .llama4 import Llama4, Llama4Output
from .moe import RouterStats

__all__ = ["Llama4", "Llama4Output", "RouterStats"]
