"""Sharded checkpoints of distributed runs, with torch.distributed.checkpoint (DCP).

Each rank writes its own shards of the model and optimiser state, in parallel, to one folder; a
run may resume on a different number of ranks (DCP reshards on load). The folder is written under
a temporary name and renamed by rank 0 after every rank has finished, so, as with single-process
checkpoints, a killed run leaves the previous checkpoint or the new one, never half of one. Each
rank also saves its own data position and RNG state (`trainer_RANK.pt`). `export_hf` gathers the
full weights on rank 0 and writes the Hugging Face layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..train.checkpoint import Checkpointer, CheckpointWriteError, rng_state, set_rng_state


class ShardedCheckpointer(Checkpointer):
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        rank = dist.get_rank()
        final = self.path(step)
        tmp = self.folder / f".tmp-{final.name}"
        error, message = torch.zeros(1), "failed on another rank"
        try:
            if rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            dist.barrier()
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
            torch.save({**state, "step": step, "rng": rng_state()}, tmp / f"trainer_{rank}.pt")
        except OSError as e:
            error[0] = 1
            message = f"{e.strerror or e}"
        dist.all_reduce(error)  # every rank agrees whether the checkpoint is complete
        if error.item():
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"could not write checkpoint {final} ({message}); the previous "
                                       "checkpoint is intact")
        if rank == 0:
            self.publish(tmp, final)
        dist.barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        state = torch.load(path / f"trainer_{dist.get_rank()}.pt", weights_only=False)
        set_rng_state(state["rng"])
        return state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered whole (on rank 0; other ranks get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(model: nn.Module, path: str | Path) -> None:
    """Writes the Hugging Face layout of a parallelised model from rank 0."""
    from ..hf import save_pretrained
    from ..model import Llama4

    state = full_state_dict(model)
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = Llama4(model.config)
        plain.load_state_dict(state, assign=True)
        save_pretrained(plain, path)
    dist.barrier()
