"""Training loop, deterministic batching and checkpoints for DecoupledSequential models."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import BatchOrder, TrainResult, evaluate_error, train

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "BatchOrder", "TrainResult", "evaluate_error", "train"]
