"""Checkpoints written for other runtimes (GGUF for llama.cpp)."""
