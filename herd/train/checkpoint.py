"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder `step_000150/` holding
- `model/`: the weights in the Hugging Face layout (`herd.from_pretrained` and `transformers` load it);
- `trainer.pt`: optimiser state, step, data position, RNG states, load-balancing biases, and the
  state of any trainable loss (the contrastive heads).
It is written under a temporary name in the same folder and renamed only when complete, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of one; a
full disk or an unwritable folder raises `CheckpointWriteError` and removes the partial folder.

(Sharded checkpoints of distributed runs use torch.distributed.checkpoint: herd.distributed.)
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..hf import from_hf_key, save_pretrained
from ..model import Llama4

STEP_PREFIX = "step_"


class CheckpointWriteError(RuntimeError):
    """The checkpoint could not be written (disk full, permissions, ...); the previous one is intact."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def check_writable(folder: Path) -> None:
    """Fails early, with a clear message, if the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(f"run folder {folder} is not writable ({e.strerror or e}); choose another "
                                   "with --out=PATH") from None


def step_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary folders are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


class Checkpointer:
    """Where a run's checkpoints live and how a finished one is published; `LocalCheckpointer` and
    herd.distributed's `ShardedCheckpointer` write and read their contents."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep

    def latest(self) -> Path | None:
        dirs = step_dirs(self.folder)
        return dirs[-1] if dirs else None

    def path(self, step: int) -> Path:
        return self.folder / f"{STEP_PREFIX}{step:06d}"

    def publish(self, tmp: Path, final: Path) -> None:
        """Renames a complete temporary folder to its final name (replacing a re-run of the same
        step, after resuming) and keeps only the newest `keep` checkpoints."""
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in step_dirs(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class LocalCheckpointer(Checkpointer):
    """Checkpoints of a single-process run: HF-layout model + trainer.pt."""

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        final = self.path(step)
        tmp = self.folder / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_model(model, tmp / "model")
            torch.save({**state, "step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()},
                       tmp / "trainer.pt")
            self.publish(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(
                f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is intact. "
                "Free disk space or choose another run folder with --out=PATH") from None
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        load_model(model, path / "model")
        state = torch.load(path / "trainer.pt", weights_only=False)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return state


def save_model(model: nn.Module, path: Path) -> None:
    """The Llama 4 inside `model` in the Hugging Face layout."""
    assert isinstance(model, Llama4), f"expected a Llama4, got {type(model).__name__}"
    save_pretrained(model, path)


@torch.no_grad()
def load_model(model: Llama4, path: Path) -> None:
    """Copies HF-layout weights into an existing model in place (the optimiser keeps its references)."""
    multimodal = model.config.vision is not None
    params = dict(model.named_parameters())
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    seen = set()
    for file in files:
        for key, tensor in load_file(file).items():
            name = from_hf_key(key, multimodal)
            if name not in params:
                raise ValueError(f"checkpoint {file} holds {key!r}, which this model does not have")
            params[name].copy_(tensor)
            seen.add(name)
    missing = set(params) - seen
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)[:5]}")
