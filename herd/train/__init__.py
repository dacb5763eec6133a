"""Training: the one loop (`train`), its configs and presets, losses, optimiser and schedules,
MoE load balancing, MetaP, FP8, and checkpoints. The end-to-end job is `herd.pipeline`."""

from .config import RunConfig, TrainConfig
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "train"]
