"""The loop every rank runs: its stage of a decoupled model, fed by the previous rank, feeding the next.

Stage ``k`` receives a micro-batch's activation (and labels) from ``k - 1``, trains on it with its
synthetic gradient, sends its output on and the gradient at its input back, then applies whatever
SG targets have come back from ``k + 1`` meanwhile. It only ever waits for *earlier* stages (their
activations) or for a full send queue; never for a later stage's backward.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..train.loop import BatchOrder
from .health import Health, PeerFailure
from .stage import DecoupledStage
from .wire import BACKWARD_TAG, ConnectionLost, FORWARD_TAG, Kind, Message, Receiver, Sender, WireError, check_tensor_spec

FAULT_KINDS = ("exit", "hang")


@dataclasses.dataclass(frozen=True)
class Fault:
    """Fault injection for tests and drills: ``rank`` is killed (SIGKILL) or hangs before micro-batch ``step``."""

    rank: int
    step: int
    kind: str = "exit"

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind: expected one of {FAULT_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    steps: int  #: micro-batches to train (each stage updates once per micro-batch)
    micro_batch_size: int
    seed: int = 0
    queue_depth: int = 2  #: messages queued per channel and direction before a sender waits
    timeout: float = 60.0  #: seconds after which a silent rank counts as dead or hung
    eval_every: int = 0  #: micro-batches between test evaluations (0: only at the end)
    checkpoint_dir: Optional[Path] = None
    checkpoint_every: int = 0
    resume: bool = False
    fault: Optional[Fault] = None

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "queue_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir: needed when checkpoint_every > 0")


class Data(NamedTuple):
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclasses.dataclass
class StageReport:
    """What one rank measured."""

    rank: int
    start_step: int
    steps: int
    train_seconds: float  #: from the start barrier to this stage's last micro-batch, evaluations excluded
    staleness_mean: float = float("nan")
    staleness_max: int = -1
    targets_applied: int = 0
    targets_dropped: int = 0
    sg_loss_last: float = float("nan")
    train_loss_last: float = float("nan")
    history: list = dataclasses.field(default_factory=list)  #: last stage: {step, train_seconds, test_error, train_loss}


def checkpoint_path(folder: Path, rank: int, step: int) -> Path:
    return Path(folder) / f"stage{rank}-step{step}.pt"


def saved_steps(folder: Optional[Path], rank: int) -> set[int]:
    if folder is None or not Path(folder).is_dir():
        return set()
    steps = set()
    for path in Path(folder).glob(f"stage{rank}-step*.pt"):
        try:
            steps.add(int(path.stem.split("-step")[1]))
        except ValueError:
            continue
    return steps


def resume_step(folder: Optional[Path], rank: int) -> int:
    """The newest step every stage has a checkpoint of (0: none). A collective: all ranks call it."""
    mine = saved_steps(folder, rank)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    common = set.intersection(*(set(s) for s in everyone))
    return max(common, default=0)


class StageRunner:
    """Runs one rank's :class:`DecoupledStage` until the first stage says STOP."""

    def __init__(self, stage: DecoupledStage, loss_fn: Callable, config: PipelineConfig, *,
                 input_spec: tuple[torch.dtype, tuple[int, ...]], health: Health, run_config: Optional[dict] = None):
        self.stage, self.loss_fn, self.config, self.health = stage, loss_fn, config, health
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.input_dtype, self.input_shape = input_spec
        self.run_config = run_config or {}
        self.to_next = self.from_next = self.to_prev = self.from_prev = None
        self.report = StageReport(rank=self.rank, start_step=0, steps=0, train_seconds=0.0)
        self._eval_seconds = 0.0
        self._eval_wrong = self._eval_count = 0

    # -- the loop -------------------------------------------------------------------------------
    def run(self, data: Optional[Data], start_step: int = 0) -> StageReport:
        self.report.start_step = start_step
        self._open_channels()
        self._t0 = time.perf_counter()
        if self.stage.is_first:
            self._run_first(data, start_step)
        else:
            self._run_downstream()
        self._shutdown()
        self._finish_report()
        return self.report

    def _run_first(self, data: Data, start_step: int) -> None:
        order = BatchOrder(len(data.train_x), self.config.micro_batch_size, self.config.seed)
        for step in range(start_step, self.config.steps):
            self._maybe_fault(step)
            idx = order(step)
            x, y = data.train_x[idx], data.train_y[idx]
            check_tensor_spec("input", x, self.input_dtype, self.input_shape, "training data")
            self._train(step, x, y)
            if self._eval_due(step):
                self._evaluate_upstream(step, data)
        if self.to_next is not None:
            self.to_next.send(Message(Kind.STOP, self.config.steps))

    def _run_downstream(self) -> None:
        while True:
            message = self._next_from_prev()
            if message.kind == Kind.TRAIN:
                self._maybe_fault(message.micro_batch)
                x, y = self._check_payload(message)
                self._train(message.micro_batch, x, y)
            elif message.kind == Kind.EVAL:
                x, y = self._check_payload(message)
                self._evaluate_batch(message.micro_batch, x, y)
            elif message.kind == Kind.EVAL_END:
                self._end_evaluation(message.micro_batch)
            elif message.kind == Kind.STOP:
                if self.to_next is not None:
                    self.to_next.send(message)
                return
            else:
                raise WireError(f"rank {self.rank}: unexpected {message.kind.name} message from rank {self.rank - 1}")

    def _train(self, step: int, x: Tensor, y: Tensor) -> None:
        result = self.stage.train_micro_batch(step, x, y, self.loss_fn)
        if self.to_next is not None:
            self.to_next.send(Message(Kind.TRAIN, step, (result.output, y)))
        if self.to_prev is not None:
            self.to_prev.send(Message(Kind.GRAD, step, (result.input_grad,)))
        if result.loss is not None:
            self.report.train_loss_last = float(result.loss)
        self.report.steps += 1
        self.health.beat()
        self.report.train_seconds = time.perf_counter() - self._t0 - self._eval_seconds
        self._apply_arrived_targets()
        self._maybe_checkpoint(step + 1)

    def _open_channels(self) -> None:
        depth, serve = self.config.queue_depth, self._serve
        if self.rank + 1 < self.world_size:
            self.to_next = Sender(self.rank + 1, FORWARD_TAG, depth, serve)
            self.from_next = Receiver(self.rank + 1, BACKWARD_TAG, depth)
        if self.rank > 0:
            self.to_prev = Sender(self.rank - 1, BACKWARD_TAG, depth, serve)
            self.from_prev = Receiver(self.rank - 1, FORWARD_TAG, depth)

    def _serve(self) -> None:
        """What a waiting stage does: take the next stage's gradients (it may be waiting for us to
        take them before it takes our activations: a plain wait could deadlock) and beat."""
        self._apply_arrived_targets()
        self.health.beat()
        time.sleep(0.0005)

    def _apply_arrived_targets(self) -> None:
        """Apply every target that has come back, without waiting for any."""
        while self.from_next is not None and not self.from_next.stopped:
            message = self.from_next.poll()
            if message is None:
                return
            self._apply_target(message)

    def _apply_target(self, message: Message) -> None:
        if message.kind == Kind.STOP:
            return
        if message.kind != Kind.GRAD or len(message.tensors) != 1:
            raise WireError(f"rank {self.rank}: expected a GRAD message from rank {self.rank + 1}, got {message}")
        try:
            self.stage.apply_target(message.micro_batch, message.tensors[0])
        except ValueError as err:
            raise WireError(f"rank {self.rank}: gradient from rank {self.rank + 1}: {err}") from None

    def _next_from_prev(self) -> Message:
        """Wait for the previous stage's next message, applying SG targets and beating meanwhile."""
        while True:
            message = self.from_prev.poll()
            if message is not None:
                return message
            self._serve()

    def _check_payload(self, message: Message) -> tuple[Tensor, Tensor]:
        source = f"rank {self.rank}: {message.kind.name} message {message.micro_batch} from rank {self.rank - 1}"
        if len(message.tensors) != 2:
            raise WireError(f"{source}: expected 2 tensors (activation, labels), got {len(message.tensors)}")
        x, y = message.tensors
        check_tensor_spec("activation", x, self.input_dtype, self.input_shape, source)
        check_tensor_spec("labels", y, torch.int64, (), source)
        if len(y) != len(x):
            raise WireError(f"{source}: {len(y)} labels for a batch of {len(x)}")
        return x, y

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return step + 1 == self.config.steps or (every > 0 and (step + 1) % every == 0)

    def _evaluate_upstream(self, step: int, data: Data) -> None:
        started = time.perf_counter()
        for i, start in enumerate(range(0, len(data.test_x), 1000)):
            x, y = data.test_x[start : start + 1000], data.test_y[start : start + 1000]
            self._evaluate_batch(i, x, y)
        self._end_evaluation(step + 1)
        self._eval_seconds += time.perf_counter() - started

    def _evaluate_batch(self, index: int, x: Tensor, y: Tensor) -> None:
        started = time.perf_counter()
        out = self.stage.evaluate(x)
        if self.to_next is not None:
            self.to_next.send(Message(Kind.EVAL, index, (out, y)))
        else:
            self._eval_wrong += int((out.argmax(1) != y).sum())
            self._eval_count += len(y)
        if not self.stage.is_first:
            self._eval_seconds += time.perf_counter() - started

    def _end_evaluation(self, step: int) -> None:
        if self.to_next is not None:
            self.to_next.send(Message(Kind.EVAL_END, step))
            return
        error = 100.0 * self._eval_wrong / max(self._eval_count, 1)
        self.report.history.append({"step": step, "train_seconds": self.report.train_seconds,
                                    "test_error": error, "train_loss": self.report.train_loss_last})
        self._eval_wrong = self._eval_count = 0

    # -- checkpoints, faults, shutdown ----------------------------------------------------------
    def _maybe_checkpoint(self, step: int) -> None:
        every, folder = self.config.checkpoint_every, self.config.checkpoint_dir
        if not every or step % every:
            return
        state = {"step": step, "rank": self.rank, "world_size": self.world_size, "stage": self.stage.state_dict(),
                 "run_config": self.run_config, "history": self.report.history}
        save_checkpoint(checkpoint_path(folder, self.rank, step), state)
        # Stages run at different steps: delete only what is older than the newest step *every* stage
        # has saved, so a complete, consistent set always survives a crash.
        store = self.health.store
        store.set(f"fastdni/checkpoint/{self.rank}", str(step))
        keys = [f"fastdni/checkpoint/{r}" for r in range(self.world_size)]
        if store.check(keys):
            common = min(int(store.get(k)) for k in keys)
            for old in saved_steps(folder, self.rank):
                if old < common:
                    checkpoint_path(folder, self.rank, old).unlink(missing_ok=True)

    def load(self, step: int) -> None:
        state = load_checkpoint(checkpoint_path(self.config.checkpoint_dir, self.rank, step))
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise CheckpointError(f"checkpoint: written by rank {state.get('rank')} of {state.get('world_size')}, "
                                  f"this is rank {self.rank} of {self.world_size}")
        if state.get("run_config") != self.run_config:
            raise CheckpointError("checkpoint: written for a different run configuration")
        self.stage.load_state_dict(state["stage"])
        self.report.history = list(state["history"])
        # Newer files of this stage belong to the interrupted run's future: this run rewrites them.
        for newer in saved_steps(self.config.checkpoint_dir, self.rank):
            if newer > step:
                checkpoint_path(self.config.checkpoint_dir, self.rank, newer).unlink(missing_ok=True)

    def _maybe_fault(self, step: int) -> None:
        fault = self.config.fault
        if fault is None or fault.rank != self.rank or fault.step != step:
            return
        if fault.kind == "exit":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # "hang": alive but silent, as a rank stuck in a deadlock or a driver call
            time.sleep(3600)

    def _shutdown(self) -> None:
        """After STOP went forward: apply the last targets until the next stage says STOP on the
        backward channel, then tell the previous stage the same and finish every send."""
        while self.from_next is not None and not self.from_next.stopped:
            message = self.from_next.poll()
            if message is None:
                self.health.beat()
                time.sleep(0.0005)
                continue
            self._apply_target(message)
        if self.to_prev is not None:
            self.to_prev.send(Message(Kind.STOP, self.config.steps))
        for sender in (self.to_next, self.to_prev):
            if sender is not None:
                sender.flush()

    def _finish_report(self) -> None:
        s = self.stage
        self.report.targets_applied = len(s.staleness)
        self.report.targets_dropped = s.dropped
        if s.staleness:
            self.report.staleness_mean = sum(s.staleness) / len(s.staleness)
            self.report.staleness_max = max(s.staleness)
        if s.sg_losses:
            self.report.sg_loss_last = s.sg_losses[-1]


def run_stage(runner: StageRunner, data: Optional[Data]) -> StageReport:
    """Resume if asked, run, and on any failure record it for the other ranks before raising."""
    try:
        start = resume_step(runner.config.checkpoint_dir, runner.rank) if runner.config.resume else 0
        if start:
            runner.load(start)
        dist.barrier()  # every stage built and loaded: start the clocks together
        runner.health.restart_clocks()
        report = runner.run(data, start)
        runner.health.mark_done()
        return report
    except PeerFailure:
        raise
    except (ConnectionLost, dist.DistError) as err:  # a connection broke: find out which rank failed first
        raise runner.health.diagnose(f"rank {runner.rank}: {err}") from err
    except Exception as err:
        runner.health.abort(f"rank {runner.rank} failed: {type(err).__name__}: {err}")
        raise
