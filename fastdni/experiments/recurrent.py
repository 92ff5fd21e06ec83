"""Recurrent DNI: an LSTM trained with truncated BPTT, with or without synthetic gradients at the
truncation boundaries, on copy, repeat copy and character-level Penn Treebank (the paper's Sec. 3.1).

    python -m fastdni.experiments.recurrent copy --truncation 3          # bptt, dni, dni-aux x seeds 0 1 2
    python -m fastdni.experiments.recurrent repeat-copy --all            # and every T in {2, 3, 4, 5}
    python -m fastdni.experiments.recurrent ptb --truncation 5 --data ../shared/datasets

Every method and seed of one ``T`` trains in one process as one stacked group of runs
(:mod:`fastdni.experiments.recurrent_runs`): one set of batched GEMMs per step, equal steps for every run.
Methods: ``bptt`` (the state is cut at every boundary), ``dni`` (a linear SG over the LSTM state (h, c) at every
boundary, :class:`fastdni.nn.TruncationDNI`'s math), ``dni-aux`` (DNI+Aux). One training step is one window of
``T`` steps of every stream, followed by an update. Settings, evidence and results: docs/recurrent.md.

Writes to ``--out``: ``<method>-T<T>-s<seed>.csv`` (log, with the SG alignment diagnostic), ``T<T>.pt``
(checkpoint, see ``--resume``), ``results.json`` (one row per task, method, T and seed; rows of other keys are
kept), a plot (``curriculum.png`` or ``valid_bpc.png``) and prints the tables.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..data import DatasetError, load_ptb_chars
from ..data.copy_streams import CopyStreams, StreamCurriculum
from ..train import CheckpointError, load_checkpoint, save_checkpoint
from .recurrent_runs import METHODS, RunGroup, masked_bce

TASKS = ("copy", "repeat-copy", "ptb")
GRID_TRUNCATIONS = (2, 3, 4, 5)
# Defaults: one command (3 methods x 3 seeds at one T) takes <= 20 minutes on 2 cores (docs/recurrent.md).
DEMO = {
    # sg_lambda None: by T (copy_sg_lambda).
    "copy": dict(hidden=128, batch_size=32, steps=20_000, eval_every=1_000, lr=1e-3, sg_lr=1e-2, sg_scale=1.0,
                 bootstrap=1.0, sg_lambda=None),
    "repeat-copy": dict(hidden=128, batch_size=32, steps=20_000, eval_every=1_000, lr=1e-3, sg_lr=1e-2, sg_scale=1.0,
                        bootstrap=1.0, sg_lambda=None),
    # One continuous stream: an undiscounted bootstrap diverges there (docs/recurrent.md). steps: one epoch.
    # sg_scale 1 with the calibrated SG (0.1 was the paper-M setting; calibrated, 1 was better: docs/recurrent.md).
    "ptb": dict(hidden=128, batch_size=256, steps=None, eval_every=500, lr=2e-3, sg_lr=1e-2, sg_scale=1.0,
                bootstrap=0.1, sg_lambda=0.0),
}
# The copy tasks' two-window SG targets, measured at 20,000 windows on both tasks (docs/recurrent.md): lambda 1
# solved longer at T = 2, 3 (the one-window targets' bootstrap chains are longest there); at T = 4, 5 two full windows
# span 8-10 steps, the targets grew with the core's long-range Jacobians, the calibrated gain fell to 0 and DNI dropped
# to BPTT's length on copy (all seeds at T = 4, one at T = 5); with the second window at half weight DNI solved
# longer than with one window at copy T = 5 and repeat copy T = 4 (and 0.33 less at copy T = 4).
TWO_WINDOW_MAX_T = 3  #: up to this T the second window counts fully (lambda 1), above it at LONG_WINDOW_LAMBDA
LONG_WINDOW_LAMBDA = 0.5


def copy_sg_lambda(truncation: int) -> float:
    """The copy tasks' default ``sg_lambda`` at window ``truncation``."""
    return 1.0 if truncation <= TWO_WINDOW_MAX_T else LONG_WINDOW_LAMBDA


PAPER_HIDDEN = {"copy": 256, "repeat-copy": 256, "ptb": 1024}  # the paper's LSTM sizes; the rest stays ours
LOG_FIELDS = ("step", "length", "max_length", "train_bits", "valid_bpc", "sg_loss", "sg_loss_normalised", "aux_loss",
              "sg_cosine", "sg_norm_ratio", "sg_gain", "train_seconds")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Everything that defines one group of runs (one task and T); a checkpoint resumes only the same."""

    task: str
    truncation: int
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int  #: windows of T steps (one update each)
    hidden: int
    batch_size: int  #: streams per run
    lr: float  #: Adam learning rate of the LSTM and readout
    sg_lr: float  #: Adam learning rate of the SG model and the aux predictor
    aux_weight: float = 0.1  #: weight of the DNI+Aux loss (dni-aux only)
    sg_scale: float = 1.0  #: the segment receives sg_scale * M(s_end) / B
    bootstrap: float = 1.0  #: M's target bootstraps from bootstrap * M(s_end) / B
    sg_hidden: int = 0  #: 0: a linear SG (the paper's); else one ReLU hidden layer of this width
    sg_lambda: float = 0.0  #: M's targets: the lambda-return over two windows (0: one window, the paper's)
    sg_ops: bool = True  #: the SG's regression and Adam step on the fused ops (RunGroup.use_fused_sg); else autograd
    calibrate: bool = True  #: dni, dni-aux: M used as alpha * M (TruncationDNI's calibrate; False: the paper's M)
    episodic: bool = True  #: copy tasks: zero the state at every episode start (else one continuous stream)
    threshold: float = 0.15  #: copy tasks: the curriculum's error threshold
    error_unit: str = "bit"  #: copy tasks: the threshold's unit, bits per output bit or per step
    bits: int = 8
    max_repeats: int = 4
    data_seed: int = 0

    @property
    def runs(self) -> list[tuple[str, int]]:
        return [(m, s) for m in self.methods for s in self.seeds]

    def run_name(self, method: str, seed: int) -> str:
        return f"{method}-T{self.truncation}-s{seed}"


def build_group(config: GroupConfig, in_features: int, out_features: int) -> tuple[RunGroup, list]:
    methods, seeds = zip(*config.runs)
    group = RunGroup(methods, seeds, in_features, config.hidden, out_features, sg_scale=config.sg_scale,
                     aux_weight=config.aux_weight, bootstrap=config.bootstrap, sg_hidden=config.sg_hidden,
                     calibrate=config.calibrate, sg_lambda=config.sg_lambda)
    optimizers = [torch.optim.Adam(group.core_parameters(), lr=config.lr),
                  torch.optim.Adam(group.sg_parameters(), lr=config.sg_lr)]
    if config.sg_ops:
        reason = group.use_fused_sg(optimizers[1])
        if reason is not None:
            print(f"note: the SG runs on autograd ({reason})", file=sys.stderr)
    return group, optimizers


def step_optimizers(optimizers: list) -> None:
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


CHECKPOINT_FORMAT = 2  #: 2: RunGroup's SG weights stored [R, out, in] (1, unmarked: [R, in, out])


class GroupRun:
    """Bookkeeping: progress bar, one log per run, checkpoint, resume, timing."""

    def __init__(self, config: GroupConfig, out: Path, *, eval_every: int, checkpoint_every: int, resume: bool,
                 progress: bool):
        self.config, self.out, self.eval_every, self.checkpoint_every = config, out, eval_every, checkpoint_every
        self.checkpoint_path = out / f"T{config.truncation}.pt"
        self.start, self.train_seconds = 0, 0.0
        self.history: list[list[dict]] = [[] for _ in config.runs]
        self.restored: Optional[dict] = None
        if resume and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"checkpoint: {self.checkpoint_path} has format {state.get('format')}, this version reads "
                    f"{CHECKPOINT_FORMAT} (the SG's weights are stored differently); start it again without --resume")
            if state.get("config") != dataclasses.asdict(config):
                raise CheckpointError(
                    f"checkpoint: {self.checkpoint_path} was written for a different run ({state.get('config')}), "
                    f"not {dataclasses.asdict(config)}; use another output folder or drop --resume")
            if state["step"] > config.steps:
                raise CheckpointError(f"checkpoint: at step {state['step']}, beyond the {config.steps} steps asked for")
            self.start, self.history, self.train_seconds = state["step"], state["history"], state["train_seconds"]
            self.restored = state
        self.bar = tqdm(total=config.steps, initial=self.start, desc=f"{config.task} T={config.truncation}",
                        disable=not progress, leave=False, dynamic_ncols=True)

    def timed(self, fn: Callable, *args, **kwargs):
        began = time.perf_counter()
        result = fn(*args, **kwargs)
        self.train_seconds += time.perf_counter() - began
        return result

    def end_step(self, done: int, record: Callable[[int], list[dict]], extra_state: Callable[[], dict]) -> None:
        """After step ``done``: log a row per run (``record(done)``) every ``eval_every`` steps and at the end."""
        if done % self.eval_every == 0 or done == self.config.steps:
            for history, row in zip(self.history, record(done)):
                full = {key: float("nan") for key in LOG_FIELDS}
                full.update(row, step=done, train_seconds=self.train_seconds)
                history.append(full)
            for (method, seed), history in zip(self.config.runs, self.history):
                write_log(self.out / f"{self.config.run_name(method, seed)}.csv", history)
        if self.checkpoint_every and (done % self.checkpoint_every == 0 or done == self.config.steps):
            save_checkpoint(self.checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "step": done, "history": self.history, "train_seconds": self.train_seconds,
                "config": dataclasses.asdict(self.config), **extra_state()})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _mean(values: list[Tensor], runs: int) -> Tensor:
    return torch.stack(values).double().nanmean(0) if values else torch.full((runs,), float("nan"))


def run_copy(config: GroupConfig, out: Path, **run_options) -> list[dict]:
    """Copy or repeat copy with the paper's curriculum for every run of the group; returns one row per run."""
    repeats = config.max_repeats if config.task == "repeat-copy" else 0
    runs = len(config.runs)
    streams = CopyStreams(runs, config.batch_size, bits=config.bits, max_repeats=repeats, seed=config.data_seed)
    curriculum = StreamCurriculum(runs, config.batch_size, streams.output_channels, threshold=config.threshold,
                                  per=config.error_unit)
    group, optimizers = build_group(config, streams.input_channels, streams.output_channels)
    run = GroupRun(config, out, **run_options)
    state = group.initial_state(config.batch_size)
    if run.restored is not None:
        _load(run.restored, group, optimizers)
        streams.load_state_dict(run.restored["streams"])
        curriculum.load_state_dict(run.restored["curriculum"])
        state = tuple(run.restored["state"])
    resets = config.episodic
    sg_losses, sg_targets, aux_losses, errors = [], [], [], []

    def future_loss(future) -> Callable:
        def loss(s):
            logits, _, _ = group(future.inputs, s, future.starts if resets else None)
            return masked_bce(logits, future.targets, future.mask)
        return loss

    def record(done: int) -> list[dict]:
        # The SG alignment diagnostic at the current boundary: the future of every stream, looked ahead on a
        # fork of the stream, long enough to hold the rest of the longest episode.
        horizon = int(streams.episode_steps(curriculum.lengths.max(), torch.tensor(max(repeats, 1)))) + 1
        cosine, ratio = group.alignment(state, future_loss(streams.fork().window(horizon)))
        gain = group.sg_gain()
        sg, aux, err = _mean(sg_losses, runs), _mean(aux_losses, runs), _mean(errors, runs)
        normalised = sg / _mean(sg_targets, runs)
        sg_losses.clear(), sg_targets.clear(), aux_losses.clear(), errors.clear()
        return [dict(length=int(curriculum.lengths[r]), max_length=int(curriculum.max_length_reached[r]),
                     train_bits=float(err[r]), sg_loss=float(sg[r]), sg_loss_normalised=float(normalised[r]),
                     aux_loss=float(aux[r]) if group.aux_weights[r]
                     else float("nan"), sg_cosine=float(cosine[r]), sg_norm_ratio=float(ratio[r]),
                     sg_gain=float(gain[r]))
                for r in range(runs)]

    def extra_state() -> dict:
        return {"group": group.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                "pending": group.pending_state(), "streams": streams.state_dict(), "curriculum": curriculum.state_dict(),
                "state": list(state)}

    for step in range(run.start, config.steps):
        window = streams.window(config.truncation)
        loss_fn = lambda logits: masked_bce(logits, window.targets, window.mask)  # noqa: E731
        logits, state, stats = run.timed(group.train_window, window.inputs, loss_fn, state,
                                         resets=window.starts if resets else None)
        run.timed(step_optimizers, optimizers)
        with torch.no_grad():
            bits = F.binary_cross_entropy_with_logits(logits, window.targets, reduction="none").sum(-1) / math.log(2)
            if curriculum.update(bits, window.current):
                streams.set_lengths(curriculum.lengths)
            scored = window.mask.sum((0, 2))
            errors.append(torch.where(scored > 0, (bits * window.mask).sum((0, 2)) / scored.clamp(min=1)
                                      / (streams.output_channels if config.error_unit == "bit" else 1), float("nan")))
        sg_losses.append(stats.sg_loss)
        sg_targets.append(stats.sg_target_norm)
        aux_losses.append(stats.aux_loss)
        run.end_step(step + 1, record, extra_state)
    run.close()
    return [_summary(config, r, run, max_length=int(curriculum.max_length_reached[r]),
                     final_length=int(curriculum.lengths[r]),
                     curve=[(h["step"], h["max_length"]) for h in run.history[r]]) for r in range(runs)]


def _summary(config: GroupConfig, r: int, run: GroupRun, **fields) -> dict:
    method, seed = config.runs[r]
    last = run.history[r][-1] if run.history[r] else {}
    cosines = [h["sg_cosine"] for h in run.history[r] if not math.isnan(h["sg_cosine"])]
    return {"task": config.task, "method": method, "truncation": config.truncation, "seed": seed,
            "steps": config.steps, **fields, "train_bits": last.get("train_bits", float("nan")),
            "sg_cosine": sum(cosines) / len(cosines) if cosines and method != "bptt" else float("nan"),
            "cosine_curve": [(h["step"], h["sg_cosine"]) for h in run.history[r]],
            "ms_per_step": 1000.0 * run.train_seconds / max(config.steps, 1), "runs_in_group": len(config.runs),
            "train_seconds": run.train_seconds, "config": dataclasses.asdict(config)}


def _load(state: dict, group: RunGroup, optimizers: list) -> None:
    group.load_state_dict(state["group"])
    group.load_pending_state(state.get("pending"))
    for opt, s in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(s)


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[n // streams, streams]``: the text cut into ``streams`` contiguous pieces (the remainder dropped)."""
    length = len(ids) // streams
    if length < 2:
        raise ValueError(f"--batch-size: {streams} streams leave fewer than 2 of the {len(ids)} characters each")
    return ids[: length * streams].view(streams, length).t().contiguous()


def _one_hot(ids: Tensor, vocab: int, runs: int) -> Tensor:
    """``[T, B]`` ids -> ``[T, R, B, vocab]``, the same text for every run (expanded, not copied)."""
    return F.one_hot(ids, vocab).float()[:, None].expand(-1, runs, -1, -1)


def _ce_per_run(logits: Tensor, targets: Tensor) -> Tensor:
    """Per run: cross-entropy (nats) summed over steps, mean over streams. logits ``[T, R, B, V]``."""
    steps, runs, batch, vocab = logits.shape
    nats = F.cross_entropy(logits.reshape(-1, vocab), targets[:, None].expand(-1, runs, -1).reshape(-1),
                           reduction="none")
    return nats.view(steps, runs, batch).sum((0, 2)) / batch


@torch.no_grad()
def evaluate_bpc(group: RunGroup, ids: Tensor, vocab: int, *, streams: int = 16, max_chars: int = 0,
                 chunk: int = 1000) -> Tensor:
    """Bits per character of ``ids`` (its first ``max_chars`` if > 0) for every run ``[R]``, read as
    ``streams`` parallel streams from a zero state."""
    if max_chars:
        ids = ids[: max(max_chars, 2 * streams)]
    data = batchify(ids, streams)
    state, nats, count = group.initial_state(streams), 0.0, 0
    for start in range(0, data.shape[0] - 1, chunk):
        x, y = data[start : start + chunk], data[start + 1 : start + chunk + 1]
        logits, _, state = group(_one_hot(x[: len(y)], vocab, group.runs), state)
        nats = nats + _ce_per_run(logits, y) * streams
        count += y.numel()
    return nats / count / math.log(2.0)


def run_ptb(config: GroupConfig, data, out: Path, *, eval_chars: int = 0, **run_options) -> list[dict]:
    """Character-level PTB, the state carried across steps, every run of the group; one row per run."""
    vocab, runs = len(data.vocab), len(config.runs)
    text = batchify(data.train, config.batch_size)  # [L, B]
    group, optimizers = build_group(config, vocab, vocab)
    run = GroupRun(config, out, **run_options)
    position, state = 0, group.initial_state(config.batch_size)
    best = {"valid_bpc": torch.full((runs,), float("inf")), "step": torch.zeros(runs, dtype=torch.long),
            "params": {k: v.clone() for k, v in group.state_dict().items()}}
    if run.restored is not None:
        _load(run.restored, group, optimizers)
        position, state, best = run.restored["position"], tuple(run.restored["state"]), run.restored["best"]
    sg_losses, sg_targets, aux_losses, train_nats = [], [], [], []

    def record(done: int) -> list[dict]:
        valid = evaluate_bpc(group, data.valid, vocab, max_chars=eval_chars)
        better = valid < best["valid_bpc"]
        best["valid_bpc"] = torch.where(better, valid, best["valid_bpc"])
        best["step"] = torch.where(better, torch.full_like(best["step"], done), best["step"])
        for key, value in group.state_dict().items():  # keep each run's best weights (its slice of dim 0)
            mask = better.view(-1, *[1] * (value.dim() - 1))
            best["params"][key] = torch.where(mask, value, best["params"][key])
        sg, aux, nats = _mean(sg_losses, runs), _mean(aux_losses, runs), _mean(train_nats, runs)
        normalised = sg / _mean(sg_targets, runs)
        sg_losses.clear(), sg_targets.clear(), aux_losses.clear(), train_nats.clear()
        horizon = max(4 * config.truncation, 20)
        future = text[position : position + horizon + 1]
        cosine, ratio = torch.full((runs,), float("nan")), torch.full((runs,), float("nan"))
        if len(future) > 1:
            cosine, ratio = group.alignment(state, lambda s: _ce_per_run(
                group(_one_hot(future[:-1], vocab, runs), s)[0], future[1:]))
        return [dict(valid_bpc=float(valid[r]), sg_loss=float(sg[r]), sg_loss_normalised=float(normalised[r]),
                     sg_cosine=float(cosine[r]), sg_gain=float(group.sg_gain()[r]),
                     sg_norm_ratio=float(ratio[r]), train_bits=float(nats[r]) / config.truncation / math.log(2.0),
                     aux_loss=float(aux[r]) if group.aux_weights[r] else float("nan")) for r in range(runs)]

    def extra_state() -> dict:
        return {"group": group.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                "pending": group.pending_state(), "position": position, "state": list(state), "best": best}

    for step in range(run.start, config.steps):
        if position + config.truncation + 1 > text.shape[0]:  # a new epoch of the training text, from a zero state
            position, state = 0, group.initial_state(config.batch_size)
        x, y = text[position : position + config.truncation], text[position + 1 : position + config.truncation + 1]
        final = position + 2 * config.truncation + 1 > text.shape[0]  # the epoch's last window: nothing follows
        logits, state, stats = run.timed(group.train_window, _one_hot(x, vocab, runs),
                                         lambda lg: _ce_per_run(lg, y), state, final=final)
        run.timed(step_optimizers, optimizers)
        train_nats.append(stats.loss)
        sg_losses.append(stats.sg_loss)
        sg_targets.append(stats.sg_target_norm)
        aux_losses.append(stats.aux_loss)
        position += config.truncation
        run.end_step(step + 1, record, extra_state)
    run.close()
    group.load_state_dict(best["params"])
    test = evaluate_bpc(group, data.test, vocab)
    return [_summary(config, r, run, valid_bpc=float(best["valid_bpc"][r]), test_bpc=float(test[r]),
                     best_step=int(best["step"][r]), final_valid_bpc=run.history[r][-1]["valid_bpc"],
                     characters=config.steps * config.truncation * config.batch_size,
                     epochs=config.steps * config.truncation / text.shape[0],
                     curve=[(h["step"], h["valid_bpc"]) for h in run.history[r]]) for r in range(runs)]


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
        lines = ["| method | T | seed | steps | valid BPC (best) | test BPC | SG cosine | ms / step (group) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['truncation']} | {r['seed']} | {r['steps']} | {r['valid_bpc']:.3f} | "
                  f"{r['test_bpc']:.3f} | {r['sg_cosine']:.2f} | {r['ms_per_step']:.1f} |" for r in rows]
    else:
        lines = ["| method | T | seed | steps | max length reached | final length | train error (bits) | SG cosine | "
                 "ms / step (group) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['truncation']} | {r['seed']} | {r['steps']} | {r['max_length']} | "
                  f"{r['final_length']} | {r['train_bits']:.3f} | {r['sg_cosine']:.2f} | {r['ms_per_step']:.1f} |"
                  for r in rows]
    return "\n".join(lines)


def grid_table(rows: Sequence[dict]) -> str:
    """Methods x T of the task's result, mean over seeds with each seed's value (the paper's Table 1)."""
    key, label = _metric(rows[0]["task"])
    truncations = sorted({r["truncation"] for r in rows})
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["method"], r["truncation"]), []).append((r["seed"], r[key]))
    lines = [f"{rows[0]['task']}: {label} (mean over seeds; each seed's in brackets)",
             "| method | " + " | ".join(f"T={t}" for t in truncations) + " |", "|---|" + "---:|" * len(truncations)]
    for method in [m for m in METHODS if any(k[0] == m for k in cells)]:
        shown = []
        for t in truncations:
            values = [v for _, v in sorted(cells.get((method, t), []))]
            fmt = "{:.3f}" if key == "test_bpc" else "{:g}"
            shown.append("" if not values else fmt.format(sum(values) / len(values)) +
                         (" (" + "/".join(fmt.format(v) for v in values) + ")" if len(values) > 1 else ""))
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict], path: Path) -> None:
    """The curriculum's max length (copy tasks) or the validation BPC (ptb) against training steps, mean over
    seeds; and the SG cosine of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = rows[0]["task"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    styles = ("-", "--", "-.", ":")  # colour: the method; line style: T
    truncations = sorted({r["truncation"] for r in rows})
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["truncation"]), []).append(r)
    for (method, t), members in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        curves = [m["curve"] for m in members if m["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:n]]
        values = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
        style = dict(color=f"C{METHODS.index(method)}", linestyle=styles[truncations.index(t) % len(styles)])
        axes[0].plot(steps, values, label=f"{method} T={t}", **style)
        if method != "bptt":
            cos = [m.get("cosine_curve") for m in members if m.get("cosine_curve")]
            if cos:
                n = min(len(c) for c in cos)
                axes[1].plot([c[0] for c in cos[0][:n]], [sum(c[i][1] for c in cos) / len(cos) for i in range(n)],
                             label=f"{method} T={t}", **style)
    axes[0].set_ylabel("validation BPC" if task == "ptb" else "max length N reached (mean over seeds)")
    axes[0].set_title(f"{task}: " + ("LSTM language model" if task == "ptb" else "curriculum"))
    axes[1].set_ylabel("cosine(M(s)/B, gradient truncation drops)")
    axes[1].set_title("SG alignment diagnostic")
    axes[1].axhline(0, color="grey", linewidth=0.5)
    for ax in axes:
        ax.set_xlabel("training step (window)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge_results(path: Path, rows: Sequence[dict]) -> list[dict]:
    """The rows of ``path`` (if any, of the same task) with ``rows`` replacing those of the same method, T, seed."""
    kept = []
    if path.exists():
        try:
            kept = json.loads(path.read_text())
        except json.JSONDecodeError:
            kept = []
    key = lambda r: (r.get("task"), r.get("method"), r.get("truncation"), r.get("seed"))  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in kept if isinstance(r, dict) and r.get("task") == rows[0]["task"] and key(r) not in new
            and r.get("method") in METHODS and "seed" in r]
    return sorted(kept + list(rows), key=lambda r: (METHODS.index(r["method"]), r["truncation"], r["seed"]))


def _number(name: str, expected: str, holds, kind=float):
    """An argparse type: ``kind(text)`` where ``holds(value)``, else an error naming ``name`` and ``expected``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number {expected}, got {text!r}") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{name}: expected a number {expected}, got {value}")
        return value
    return parse


def _positive(name: str, kind=int):
    return _number(name, "> 0", lambda v: v > 0, kind)


def _non_negative_float(name: str):
    return _number(name, ">= 0", lambda v: v >= 0)


def _unit_interval(name: str):
    return _number(name, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdni.experiments.recurrent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--methods", choices=METHODS, nargs="+", default=list(METHODS), help="default: all three")
    p.add_argument("--method", choices=METHODS, default=None, help="one method only (same as --methods M)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default 0 1 2)")
    p.add_argument("--truncation", "-T", type=_positive("--truncation"), default=3, help="BPTT window T (default 3)")
    p.add_argument("--all", action="store_true", help="every T of --truncations, one group after the other")
    p.add_argument("--truncations", type=_positive("--truncations"), nargs="+", default=list(GRID_TRUNCATIONS),
                   help="the T values of --all (default 2 3 4 5)")
    p.add_argument("--steps", type=_positive("--steps"), default=None, help="training steps (windows of T) per run")
    p.add_argument("--hidden", type=_positive("--hidden"), default=None, help="LSTM units (default 128; --paper: 256, ptb 1024)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=None, help="streams per run (32)")
    p.add_argument("--lr", type=_positive("--lr", float), default=None, help="Adam learning rate of the LSTM and readout")
    p.add_argument("--sg-lr", type=_positive("--sg-lr", float), default=None,
                   help="Adam learning rate of the SG model and aux predictor")
    p.add_argument("--aux-weight", type=_non_negative_float("--aux-weight"), default=0.1,
                   help="weight of the DNI+Aux loss (default 0.1)")
    p.add_argument("--sg-scale", type=_positive("--sg-scale", float), default=None,
                   help="scale of the synthetic gradient the segment receives, times the calibration's gain (default 1)")
    p.add_argument("--bootstrap", type=_non_negative_float("--bootstrap"), default=None,
                   help="weight of the bootstrapped term of the SG's target (default: copy tasks 1, undiscounted; "
                        "ptb 0.1)")
    p.add_argument("--sg-lambda", type=_unit_interval("--sg-lambda"), default=None,
                   help="lambda of the SG's two-window lambda-return targets (default: copy tasks 1 at T <= 3, else 0.5; "
                        "ptb 0; 0: one window, the paper's)")
    p.add_argument("--sg-hidden", type=int, default=0,
                   help="0: a linear SG over (h, c), the paper's (default); N: one ReLU hidden layer of N units")
    p.add_argument("--no-calibrate", action="store_true",
                   help="dni, dni-aux: use M as the paper does (default: calibrated, M scaled by the least-squares "
                        "fit of its targets on its predictions, TruncationDNI's calibrate)")
    p.add_argument("--sg-autograd", action="store_true",
                   help="the SG's regression and Adam step on autograd and torch.optim (default: the fused ops)")
    p.add_argument("--stream", action="store_true",
                   help="copy tasks: one continuous stream, the state never reset (default: reset at each episode)")
    p.add_argument("--threshold", type=_positive("--threshold", float), default=0.15,
                   help="copy tasks: curriculum error threshold in bits (default 0.15)")
    p.add_argument("--error-unit", choices=("bit", "step"), default="bit",
                   help="copy tasks: the threshold per output bit (default) or per step (summed over the bits)")
    p.add_argument("--bits", type=_positive("--bits"), default=8, help="copy tasks: bits per pattern vector (8)")
    p.add_argument("--max-repeats", type=_positive("--max-repeats"), default=4, help="repeat copy: largest R (4)")
    p.add_argument("--eval-every", type=_positive("--eval-every"), default=None, help="steps between log rows / evaluations")
    p.add_argument("--eval-chars", type=int, default=0,
                   help="ptb: validate on the first N characters during training (default 0: the whole split)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's LSTM size: 256 units (copy tasks), 1024 (ptb); explicit flags still win")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the copy tasks' streams")
    p.add_argument("--data", type=Path, default=None, help="ptb: datasets folder (holding ptb/) or the ptb folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/recurrent/<task>)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue each group from its checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    for key, value in DEMO[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, PAPER_HIDDEN[args.task] if key == "hidden" and args.paper else value)
    if args.method is not None:
        args.methods = [args.method]
    args.methods = list(dict.fromkeys(args.methods))
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.checkpoint_every < 0 or args.eval_chars < 0 or args.sg_hidden < 0:
        p.error("--checkpoint-every/--eval-chars/--sg-hidden: expected >= 0")
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
    truncations = list(dict.fromkeys(args.truncations)) if args.all else [args.truncation]
    run_options = dict(eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
                       progress=not args.no_progress)
    rows = []
    for truncation in truncations:
        steps = args.steps or len(data.train) // (args.batch_size * truncation)  # ptb's default: one epoch
        config = GroupConfig(
            task=args.task, truncation=truncation, methods=tuple(args.methods), seeds=tuple(args.seeds),
            steps=steps, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr, sg_lr=args.sg_lr,
            aux_weight=args.aux_weight, sg_scale=args.sg_scale, bootstrap=args.bootstrap, sg_hidden=args.sg_hidden,
            sg_lambda=copy_sg_lambda(truncation) if args.sg_lambda is None else args.sg_lambda,
            sg_ops=not args.sg_autograd, calibrate=not args.no_calibrate, episodic=not args.stream,
            threshold=args.threshold, error_unit=args.error_unit, bits=args.bits, max_repeats=args.max_repeats,
            data_seed=args.data_seed)
        try:
            group_rows = run_ptb(config, data, args.out, eval_chars=args.eval_chars, **run_options) \
                if args.task == "ptb" else run_copy(config, args.out, **run_options)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rows += group_rows
        seconds = group_rows[0]["train_seconds"]
        print(f"{args.task} T={truncation}: {len(group_rows)} runs, {config.steps} steps each, {seconds:.0f} s "
              f"training", flush=True)
    merged = merge_results(args.out / "results.json", rows)
    (args.out / "results.json").write_text(json.dumps(merged, indent=2))
    plot_path = args.out / ("valid_bpc.png" if args.task == "ptb" else "curriculum.png")
    plot_curves(merged, plot_path)
    print(results_table(merged))
    print()
    print(grid_table(merged))
    print(f"wrote {args.out / 'results.json'} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
