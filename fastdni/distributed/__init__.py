"""Decoupled training across processes: one pipeline stage per rank on ``torch.distributed``.

Each stage updates from its synthetic gradient as soon as its forward is done and applies the SG
targets from the next stage whenever they arrive, so no stage waits for a later stage's backward.
Launch with ``torchrun`` (see :mod:`fastdni.experiments.pipeline`).
"""
from .emulated import EmulatedCost
from .health import Health, PeerFailure
from .runtime import Data, Fault, PipelineConfig, StageReport, StageRunner, run_stage
from .stage import DecoupledStage, split_stages, stage_bounds
from .wire import Kind, Message, WireError

__all__ = [
    "Data", "DecoupledStage", "EmulatedCost", "Fault", "Health", "Kind", "Message", "PeerFailure",
    "PipelineConfig", "StageReport", "StageRunner", "WireError", "run_stage", "split_stages", "stage_bounds",
]
