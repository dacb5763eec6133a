"""Parallelism applied from outside the model: FSDP2 for every weight, expert parallelism for the
routed experts, sharded checkpoints. `parallelize(model, mesh)` is the one entry point.

Launch with torchrun (one process per GPU, or per CPU socket with gloo); see docs/training.md.
"""

from .mesh import ParallelContext, init_distributed
from .parallelize import parallelize

__all__ = ["ParallelContext", "init_distributed", "parallelize"]
