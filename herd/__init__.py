"""herd: a readable PyTorch implementation of the whole Llama 4 system.

Importing herd touches no device, environment variable or process group.
"""

from .config import ModelConfig, TextConfig, VisionConfig
from .presets import PRESETS, get_preset


def from_pretrained(path, **kwargs):
    """Loads a Hugging Face Llama 4 checkpoint directory (see `herd.hf.from_pretrained`)."""
    from .hf import from_pretrained as _load

    return _load(path, **kwargs)


def save_pretrained(model, path, **kwargs):
    """Writes `model` as a Hugging Face checkpoint directory (see `herd.hf.save_pretrained`)."""
    from .hf import save_pretrained as _save

    _save(model, path, **kwargs)


__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "PRESETS", "get_preset", "from_pretrained", "save_pretrained"]
