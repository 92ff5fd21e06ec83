"""Recurrent DNI: an LSTM trained with truncated BPTT, with or without synthetic gradients at the
truncation boundaries, on copy, repeat copy and character-level Penn Treebank (the paper's Sec. 3.1).

    python -m fastdni.experiments.recurrent copy --method dni --truncation 3
    python -m fastdni.experiments.recurrent repeat-copy --method dni-aux --truncation 4
    python -m fastdni.experiments.recurrent ptb --method bptt --truncation 5 --data ../shared/datasets
    python -m fastdni.experiments.recurrent copy --all          # T in {2, 3, 4, 5} x {bptt, dni, dni-aux}
    python -m fastdni.experiments.recurrent ptb --paper ...     # the paper's LSTM size (1024; copy tasks 256)

Methods: ``bptt`` is plain truncated BPTT (the state is cut at every boundary); ``dni`` adds a linear
synthetic-gradient model over the LSTM state (h, c) at every boundary (:class:`fastdni.nn.TruncationDNI`);
``dni-aux`` also trains the core to predict the boundary's synthetic gradient from every step's output
(DNI+Aux, see :mod:`fastdni.nn.recurrent`). The parameters are updated after every segment of ``T`` steps.

Copy tasks: one training step is one batch of sequences at the curriculum's length ``N`` (the paper's
curriculum: ``N`` grows by one when the average error of the last 10 batches falls below 0.15 bits per
step); the result is the largest ``N`` solved within the step budget. Penn Treebank: one training step is
``--seq-len`` characters of each of ``--batch-size`` parallel streams (state carried across steps); the
result is bits per character on the validation split (best evaluation) and on the test split at that point.

Writes to ``--out``: ``<method>-T<T>.csv`` (log), ``<method>-T<T>.pt`` (checkpoint, see ``--resume``),
``results.json`` (one row per task, method and T: a row of an earlier run with another key is kept),
a plot (``curriculum.png`` or ``valid_bpc.png``), and prints a results table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import CopyTask, Curriculum, DatasetError, RepeatCopyTask, SequenceBatch, bits_per_step, load_ptb_chars
from ..nn import SyntheticGradient, TruncationDNI, truncation_windows
from ..train import CheckpointError, load_checkpoint, save_checkpoint

TASKS = ("copy", "repeat-copy", "ptb")
METHODS = ("bptt", "dni", "dni-aux")
GRID_TRUNCATIONS = (2, 3, 4, 5)
# Defaults sized so that one run (one task, method and T) takes <= 20 minutes on 2 CPU cores (docs/recurrent.md).
DEMO = {
    "copy": dict(hidden=128, batch_size=32, steps=30_000, eval_every=500, lr=1e-3, sg_lr=1e-4),
    "repeat-copy": dict(hidden=128, batch_size=32, steps=15_000, eval_every=500, lr=1e-3, sg_lr=1e-4),
    "ptb": dict(hidden=128, batch_size=32, steps=1_500, eval_every=250, lr=2e-3, sg_lr=1e-4),
}
PAPER_HIDDEN = {"copy": 256, "repeat-copy": 256, "ptb": 1024}  # the paper's LSTM sizes; the rest stays ours
LOG_FIELDS = ("step", "length", "max_length", "train_bits", "valid_bpc", "sg_loss", "aux_loss", "train_seconds")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; a checkpoint only resumes a run with the same config."""

    task: str
    method: str
    truncation: int
    steps: int
    hidden: int
    batch_size: int
    lr: float  #: Adam learning rate of the LSTM and readout
    sg_lr: float  #: Adam learning rate of the SG model (and the aux predictor)
    aux_weight: float = 0.1  #: weight of the DNI+Aux loss (dni-aux only)
    sg_scale: float = 0.1  #: the synthetic gradient is scaled by this before it enters the segment
    gradient_scale: Optional[float] = None  #: M predicts this times dL/ds; None: the batch size (per-example)
    bits: int = 8  #: copy tasks: bits per pattern vector
    max_repeats: int = 4  #: repeat copy: R is uniform in 1..max_repeats
    seq_len: int = 120  #: ptb: characters per stream per step (120 is a multiple of T = 2, 3, 4, 5, 8)
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.method}-T{self.truncation}"


class LSTMModel(nn.Module):
    """A one-layer ``nn.LSTM`` with a linear readout; time-major ``[T, B, features]``."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden)
        self.readout = nn.Linear(hidden, out_features)

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(1, batch, self.lstm.hidden_size)
        return zeros, zeros.clone()

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Logits ``[T, B, out]``, every step's hidden output ``[T, B, hidden]`` and the final state."""
        outputs, state = self.lstm(x, state)
        return self.readout(outputs), outputs, state


class Learner:
    """The model, the boundary DNI of the method (None for bptt) and their optimizers; trains segments."""

    def __init__(self, config: RunConfig, in_features: int, out_features: int):
        torch.manual_seed(config.seed)
        self.config = config
        self.model = LSTMModel(in_features, config.hidden, out_features)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.boundary: Optional[TruncationDNI] = None
        self.sg_optimizer: Optional[torch.optim.Optimizer] = None
        if config.method != "bptt":
            state_features = 2 * config.hidden  # (h, c) of the one-layer LSTM
            aux = None
            if config.method == "dni-aux":
                aux = nn.Linear(config.hidden, state_features)
                nn.init.zeros_(aux.weight)
                nn.init.zeros_(aux.bias)
            self.boundary = TruncationDNI(
                SyntheticGradient(state_features), batch_dim=1, aux_predictor=aux, aux_weight=config.aux_weight,
                sg_scale=config.sg_scale, gradient_scale=config.gradient_scale or config.batch_size,
            )
            self.sg_optimizer = torch.optim.Adam(self.boundary.parameters(), lr=config.sg_lr)

    def train_sequence(self, inputs: Tensor, loss_fn: Callable[[slice, Tensor], Tensor], state, *, episode_ends: bool):
        """Train on ``inputs`` ``[L, B, in]`` in truncation windows, one update per window; ``loss_fn(window,
        logits)`` is that window's loss. Returns all logits (detached) and the final state (detached).
        ``episode_ends``: nothing follows the sequence (no synthetic gradient after its last window)."""
        windows = truncation_windows(inputs.shape[0], self.config.truncation)
        logits_all = []
        for window in windows:
            if self.boundary is None:
                state = tuple(s.detach() for s in state)
            else:
                state = self.boundary.begin_segment(state)
            logits, outputs, state = self.model(inputs[window], state)
            loss = loss_fn(window, logits)
            if self.boundary is None:
                loss.backward()
            else:
                aux_inputs = outputs if self.boundary.aux_predictor is not None else None
                final = episode_ends and window is windows[-1]
                self.boundary.end_segment(loss, state, aux_inputs=aux_inputs, final=final)
            for opt in (self.optimizer, self.sg_optimizer):
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            logits_all.append(logits.detach())
        return torch.cat(logits_all), tuple(s.detach() for s in state)

    def losses(self) -> tuple[float, float]:
        """The SG regression loss and the aux loss of the last boundary (nan when there is none)."""
        b = self.boundary
        sg = float(b.last_sg_loss) if b is not None and b.last_sg_loss is not None else float("nan")
        aux = float(b.last_aux_loss) if b is not None and b.last_aux_loss is not None else float("nan")
        return sg, aux

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "boundary": self.boundary.state_dict() if self.boundary is not None else None,
            "sg_optimizer": self.sg_optimizer.state_dict() if self.sg_optimizer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.boundary is not None:
            self.boundary.load_state_dict(state["boundary"])
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])


class Run:
    """Bookkeeping shared by the tasks: progress bar, log, checkpoints, resume and timing."""

    def __init__(self, config: RunConfig, out: Path, *, eval_every: int, checkpoint_every: int, resume: bool, progress: bool):
        self.config, self.out, self.eval_every, self.checkpoint_every = config, out, eval_every, checkpoint_every
        self.log_path, self.checkpoint_path = out / f"{config.name}.csv", out / f"{config.name}.pt"
        self.start, self.history, self.train_seconds = 0, [], 0.0
        self.restored: Optional[dict] = None
        if resume and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            if state.get("config") != dataclasses.asdict(config):
                raise CheckpointError(
                    f"checkpoint: {self.checkpoint_path} was written for a different run ({state.get('config')}), "
                    f"not {dataclasses.asdict(config)}; use another output folder or drop --resume"
                )
            if state["step"] > config.steps:
                raise CheckpointError(f"checkpoint: at step {state['step']}, beyond the {config.steps} steps asked for")
            self.start, self.history, self.train_seconds = state["step"], list(state["history"]), state["train_seconds"]
            self.restored = state
        self.bar = tqdm(total=config.steps, initial=self.start, desc=f"{config.task} {config.name}", disable=not progress,
                        leave=False, dynamic_ncols=True)

    def timed(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, its time added to :attr:`train_seconds`."""
        began = time.perf_counter()
        result = fn(*args, **kwargs)
        self.train_seconds += time.perf_counter() - began
        return result

    def end_step(self, done: int, record: Callable[[int], dict], extra_state: Callable[[], dict]) -> None:
        """After step ``done``: log a row (``record(done)``) every ``eval_every`` steps and at the end; checkpoint."""
        if done % self.eval_every == 0 or done == self.config.steps:
            row = {key: float("nan") for key in LOG_FIELDS}
            row.update(record(done), step=done, train_seconds=self.train_seconds)
            self.history.append(row)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("max_length", "train_bits", "valid_bpc")
                                  and not math.isnan(v)})
            write_log(self.log_path, self.history)
        if self.checkpoint_every and (done % self.checkpoint_every == 0 or done == self.config.steps):
            save_checkpoint(self.checkpoint_path, {
                "step": done, "history": self.history, "train_seconds": self.train_seconds,
                "config": dataclasses.asdict(self.config), **extra_state(),
            })
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def copy_loss(batch: SequenceBatch, window: slice, logits: Tensor) -> Tensor:
    """Binary cross-entropy (nats) of the window's scored steps: summed over steps and bits, mean over the batch."""
    nats = F.binary_cross_entropy_with_logits(logits, batch.targets[window], reduction="none").sum(-1)
    return (nats * batch.mask[window]).sum() / logits.shape[1]


def ptb_loss(targets: Tensor, window: slice, logits: Tensor) -> Tensor:
    """Cross-entropy (nats) of the window's characters: summed over steps, mean over the streams."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[window].reshape(-1), reduction="sum") / logits.shape[1]


def run_copy(config: RunConfig, out: Path, **run_options) -> dict:
    """Copy or repeat copy with the paper's curriculum; returns the summary row."""
    task = CopyTask(config.bits, seed=config.seed) if config.task == "copy" else \
        RepeatCopyTask(config.bits, config.max_repeats, seed=config.seed)
    curriculum = Curriculum()
    learner = Learner(config, task.input_channels, task.output_channels)
    run = Run(config, out, **run_options)
    if run.restored is not None:
        learner.load_state_dict(run.restored["learner"])
        task.load_state_dict(run.restored["task"])
        curriculum.load_state_dict(run.restored["curriculum"])
    errors: list[float] = []
    batch_size = config.batch_size

    def record(done: int) -> dict:
        sg, aux = learner.losses()
        row = dict(length=curriculum.length, max_length=curriculum.max_length_reached, sg_loss=sg, aux_loss=aux,
                   train_bits=sum(errors) / len(errors) if errors else float("nan"))
        errors.clear()
        return row

    def extra_state() -> dict:
        return {"learner": learner.state_dict(), "task": task.state_dict(), "curriculum": curriculum.state_dict()}

    for step in range(run.start, config.steps):
        batch = task.batch(batch_size, curriculum.length)
        logits, _ = run.timed(learner.train_sequence, batch.inputs, partial(copy_loss, batch),
                              learner.model.initial_state(batch_size), episode_ends=True)
        error = float(bits_per_step(logits, batch))
        errors.append(error)
        curriculum.update(error)
        run.end_step(step + 1, record, extra_state)
    run.close()
    steps = config.steps
    return {
        "task": config.task, "method": config.method, "truncation": config.truncation, "steps": steps,
        "max_length": curriculum.max_length_reached, "final_length": curriculum.length,
        "train_bits": run.history[-1]["train_bits"] if run.history else float("nan"),
        "ms_per_step": 1000.0 * run.train_seconds / max(steps, 1), "train_seconds": run.train_seconds,
        "curve": [(h["step"], h["max_length"]) for h in run.history], "config": dataclasses.asdict(config),
    }


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[n // streams, streams]``: the text cut into ``streams`` contiguous pieces (the remainder dropped)."""
    length = len(ids) // streams
    if length < 2:
        raise ValueError(f"--batch-size: {streams} streams leave fewer than 2 of the {len(ids)} characters each")
    return ids[: length * streams].view(streams, length).t().contiguous()


@torch.no_grad()
def evaluate_bpc(model: LSTMModel, ids: Tensor, vocab: int, *, streams: int = 16, max_chars: int = 0, chunk: int = 1000) -> float:
    """Bits per character of ``ids`` (its first ``max_chars`` if > 0), read as ``streams`` parallel streams
    from a zero state."""
    if max_chars:
        ids = ids[: max(max_chars, 2 * streams)]
    data = batchify(ids, streams)
    was_training = model.training
    model.eval()
    state, nats, count = model.initial_state(streams), 0.0, 0
    for start in range(0, data.shape[0] - 1, chunk):
        x, y = data[start : start + chunk], data[start + 1 : start + chunk + 1]
        logits, _, state = model(F.one_hot(x[: len(y)], vocab).float(), state)
        nats += float(F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return nats / count / math.log(2.0)


def run_ptb(config: RunConfig, data, out: Path, *, eval_chars: int = 0, **run_options) -> dict:
    """Character-level PTB with the state carried across steps; returns the summary row."""
    vocab = len(data.vocab)
    streams = batchify(data.train, config.batch_size)  # [L, B]
    learner = Learner(config, vocab, vocab)
    run = Run(config, out, **run_options)
    position, state = 0, learner.model.initial_state(config.batch_size)
    best = {"valid_bpc": float("inf"), "step": 0, "model": None}
    if run.restored is not None:
        learner.load_state_dict(run.restored["learner"])
        position, state, best = run.restored["position"], tuple(run.restored["state"]), run.restored["best"]
    train_nats: list[float] = []
    seq_len = min(config.seq_len, streams.shape[0] - 1)

    def record(done: int) -> dict:
        sg, aux = learner.losses()
        valid = evaluate_bpc(learner.model, data.valid, vocab, max_chars=eval_chars)
        if valid < best["valid_bpc"]:
            best.update(valid_bpc=valid, step=done, model={k: v.clone() for k, v in learner.model.state_dict().items()})
        row = dict(valid_bpc=valid, sg_loss=sg, aux_loss=aux,
                   train_bits=sum(train_nats) / len(train_nats) / math.log(2.0) if train_nats else float("nan"))
        train_nats.clear()
        return row

    def extra_state() -> dict:
        return {"learner": learner.state_dict(), "position": position, "state": list(state), "best": best}

    for step in range(run.start, config.steps):
        if position + seq_len + 1 > streams.shape[0]:  # a new epoch of the training text, from a zero state
            position, state = 0, learner.model.initial_state(config.batch_size)
        x = F.one_hot(streams[position : position + seq_len], vocab).float()
        y = streams[position + 1 : position + seq_len + 1]
        epoch_ends = position + 2 * seq_len + 1 > streams.shape[0]
        logits, state = run.timed(learner.train_sequence, x, partial(ptb_loss, y), state, episode_ends=epoch_ends)
        train_nats.append(float(F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))))
        position += seq_len
        run.end_step(step + 1, record, extra_state)
    run.close()
    final_valid = run.history[-1]["valid_bpc"] if run.history else float("nan")
    if best["model"] is not None:
        learner.model.load_state_dict(best["model"])
    test = evaluate_bpc(learner.model, data.test, vocab)
    steps = config.steps
    return {
        "task": config.task, "method": config.method, "truncation": config.truncation, "steps": steps,
        "valid_bpc": best["valid_bpc"], "test_bpc": test, "best_step": best["step"], "final_valid_bpc": final_valid,
        "ms_per_step": 1000.0 * run.train_seconds / max(steps, 1), "train_seconds": run.train_seconds,
        "curve": [(h["step"], h["valid_bpc"]) for h in run.history], "config": dataclasses.asdict(config),
    }


def write_log(path: Path, history: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def _metric(task: str) -> tuple[str, str]:
    return ("test_bpc", "test BPC") if task == "ptb" else ("max_length", "max length N reached")


def results_table(rows: Sequence[dict]) -> str:
    """One line per run (Markdown)."""
    if rows and rows[0]["task"] == "ptb":
        lines = ["| method | T | steps | valid BPC (best) | test BPC | ms / step |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['truncation']} | {r['steps']} | {r['valid_bpc']:.3f} | {r['test_bpc']:.3f} | "
                  f"{r['ms_per_step']:.1f} |" for r in rows]
    else:
        lines = ["| method | T | steps | max length reached | final length | train error (bits/step) | ms / step |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['truncation']} | {r['steps']} | {r['max_length']} | {r['final_length']} | "
                  f"{r['train_bits']:.3f} | {r['ms_per_step']:.1f} |" for r in rows]
    return "\n".join(lines)


def grid_table(rows: Sequence[dict]) -> str:
    """Methods x T of the task's result (max length, or test BPC), as in the paper's Table 1."""
    key, label = _metric(rows[0]["task"])
    truncations = sorted({r["truncation"] for r in rows})
    cell = {(r["method"], r["truncation"]): r[key] for r in rows}
    lines = [f"{rows[0]['task']}: {label}", "| method | " + " | ".join(f"T={t}" for t in truncations) + " |",
             "|---|" + "---:|" * len(truncations)]
    for method in [m for m in METHODS if any(k[0] == m for k in cell)]:
        values = [cell.get((method, t)) for t in truncations]
        shown = ["" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict], path: Path) -> None:
    """The curriculum's max length (copy tasks) or the validation BPC (ptb) against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = rows[0]["task"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = ("-", "--", "-.", ":")  # colour: the method; line style: T (12 curves in a grid)
    truncations = sorted({r["truncation"] for r in rows})
    for r in rows:
        if r["curve"]:
            steps, values = zip(*r["curve"])
            ax.plot(steps, values, label=f"{r['method']} T={r['truncation']}", color=f"C{METHODS.index(r['method'])}",
                    linestyle=styles[truncations.index(r["truncation"]) % len(styles)])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BPC" if task == "ptb" else "max length N reached")
    ax.set_title(f"{task}: " + ("LSTM language model" if task == "ptb" else "curriculum"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge_results(path: Path, rows: Sequence[dict]) -> list[dict]:
    """The rows of ``path`` (if any, of the same task) with ``rows`` replacing those of the same method and T."""
    kept = []
    if path.exists():
        try:
            kept = json.loads(path.read_text())
        except json.JSONDecodeError:
            kept = []
    new = {(r["task"], r["method"], r["truncation"]) for r in rows}
    kept = [r for r in kept if isinstance(r, dict) and r.get("task") == rows[0]["task"]
            and (r.get("task"), r.get("method"), r.get("truncation")) not in new]
    merged = kept + list(rows)
    return sorted(merged, key=lambda r: (METHODS.index(r["method"]), r["truncation"]))


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an int >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected an int >= 1, got {value}")
        return value
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdni.experiments.recurrent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--method", choices=METHODS, default="dni", help="bptt, dni or dni-aux (default dni)")
    p.add_argument("--truncation", "-T", type=_positive("--truncation"), default=3, help="BPTT window T (default 3)")
    p.add_argument("--all", action="store_true", help="run every method for every T of --truncations; print the grid")
    p.add_argument("--truncations", type=_positive("--truncations"), nargs="+", default=list(GRID_TRUNCATIONS),
                   help="the T values of --all (default 2 3 4 5; the paper's PTB also has 8)")
    p.add_argument("--steps", type=_positive("--steps"), default=None, help="training steps (batches) per run")
    p.add_argument("--hidden", type=_positive("--hidden"), default=None, help="LSTM units (default 128; --paper: 256, ptb 1024)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=None, help="sequences / streams per batch (32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of the LSTM and readout")
    p.add_argument("--sg-lr", type=float, default=None, help="Adam learning rate of the SG model and aux predictor")
    p.add_argument("--aux-weight", type=float, default=0.1, help="weight of the DNI+Aux loss (default 0.1)")
    p.add_argument("--sg-scale", type=float, default=0.1,
                   help="scale of the synthetic gradient given to a segment (default 0.1; 1: unscaled)")
    p.add_argument("--gradient-scale", type=float, default=None,
                   help="the SG model predicts this times dL/ds (default: the batch size, per-example gradients)")
    p.add_argument("--bits", type=_positive("--bits"), default=8, help="copy tasks: bits per pattern vector (8)")
    p.add_argument("--max-repeats", type=_positive("--max-repeats"), default=4, help="repeat copy: largest R (4)")
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=120, help="ptb: characters per stream per step (120)")
    p.add_argument("--eval-every", type=_positive("--eval-every"), default=None, help="steps between log rows / evaluations")
    p.add_argument("--eval-chars", type=int, default=0,
                   help="ptb: validate on the first N characters during training (default 0: the whole split)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's LSTM size: 256 units (copy tasks), 1024 (ptb); explicit flags still win")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="ptb: datasets folder (holding ptb/) or the ptb folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/recurrent/<task>)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    for key, value in DEMO[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, PAPER_HIDDEN[args.task] if key == "hidden" and args.paper else value)
    for name in ("lr", "sg_lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')}: expected a learning rate > 0, got {getattr(args, name)}")
    if not args.aux_weight >= 0:
        p.error(f"--aux-weight: expected >= 0, got {args.aux_weight}")
    if not args.sg_scale > 0:
        p.error(f"--sg-scale: expected > 0, got {args.sg_scale}")
    if args.gradient_scale is not None and not args.gradient_scale > 0:
        p.error(f"--gradient-scale: expected > 0, got {args.gradient_scale}")
    if args.checkpoint_every < 0 or args.eval_chars < 0:
        p.error("--checkpoint-every/--eval-chars: expected >= 0")
    if args.out is None:
        args.out = Path("runs/recurrent") / args.task
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = None
    if args.task == "ptb":
        try:
            data = load_ptb_chars(args.data)
        except DatasetError as err:
            print(f"error: --data: {err}", file=sys.stderr)
            return 2
        if len(data.train) // args.batch_size < 2:
            print(f"error: --batch-size: {args.batch_size} streams leave fewer than 2 characters each", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    grid = [(m, t) for t in dict.fromkeys(args.truncations) for m in METHODS] if args.all else [(args.method, args.truncation)]
    run_options = dict(eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
                       progress=not args.no_progress)
    rows = []
    for method, truncation in grid:
        config = RunConfig(
            task=args.task, method=method, truncation=truncation, steps=args.steps, hidden=args.hidden,
            batch_size=args.batch_size, lr=args.lr, sg_lr=args.sg_lr, aux_weight=args.aux_weight,
            sg_scale=args.sg_scale, gradient_scale=args.gradient_scale, bits=args.bits, max_repeats=args.max_repeats, seq_len=args.seq_len,
            seed=args.seed,
        )
        try:
            if args.task == "ptb":
                row = run_ptb(config, data, args.out, eval_chars=args.eval_chars, **run_options)
            else:
                row = run_copy(config, args.out, **run_options)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rows.append(row)
        result = f"test BPC {row['test_bpc']:.3f}" if args.task == "ptb" else f"max length {row['max_length']}"
        print(f"{args.task} {config.name}: {result} after {config.steps} steps ({row['train_seconds']:.0f} s training)",
              flush=True)
    merged = merge_results(args.out / "results.json", rows)
    (args.out / "results.json").write_text(json.dumps(merged, indent=2))
    plot_path = args.out / ("valid_bpc.png" if args.task == "ptb" else "curriculum.png")
    plot_curves(merged, plot_path)
    print(results_table(merged))
    if len({r["truncation"] for r in merged}) > 1 or len({r["method"] for r in merged}) > 1:
        print()
        print(grid_table(merged))
    print(f"wrote {args.out / 'results.json'} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
