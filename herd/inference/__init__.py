"""Inference: the iRoPE-aware KV cache, the continuous-batching engine, sampling and generation."""

from .batching import Engine, Request, SamplingParams, StepOutput, TokenLogprob
from .cache import StaticKVCache
from .engine import generate, generate_stream, pad_prompts
from .fast import prepare_for_decoding
from .sampling import sample

__all__ = ["Engine", "Request", "SamplingParams", "StaticKVCache", "StepOutput", "TokenLogprob", "generate",
           "generate_stream", "pad_prompts", "prepare_for_decoding", "sample"]
