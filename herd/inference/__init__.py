"""Inference: the iRoPE-aware KV cache, sampling and the generation loop."""

from .cache import StaticKVCache
from .engine import Decoder, generate, generate_stream, pad_prompts, prefill
from .fast import prepare_for_decoding
from .sampling import sample

__all__ = ["StaticKVCache", "Decoder", "generate", "generate_stream", "pad_prompts", "prefill", "prepare_for_decoding",
           "sample"]
