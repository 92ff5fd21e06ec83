"""The paper's MNIST table (Jaderberg et al. 2016, Table 1, MNIST columns) as one command.

    python -m fastdni.experiments.mnist_table                      # the whole grid, demo budget (hours on CPU)
    python -m fastdni.experiments.mnist_table --cells 'fcn3-*' cnn-dni --steps 1000
    python -m fastdni.experiments.mnist_table --resume             # skip finished cells, continue started ones

The grid: methods {backprop, dni, cdni} x models {FCN with 3, 4, 5, 6 layers, CNN}; cell names
``fcn3-backprop`` ... ``fcn6-cdni``, ``cnn-backprop`` ... ``cnn-cdni`` (``--cells`` takes names or shell patterns).
Each cell is one run of :mod:`fastdni.experiments.mnist` with its defaults for that model and mode (learning
rates ``DEMO_LR``, SG models, schedule): ``--model fcn-bn --hidden-layers N`` for "FCN, N layers" (we read the
paper's layer count as N hidden Linear -> BatchNorm -> ReLU layers of 256 units, the linear classifier on top not
counted) and ``--model cnn`` for the CNN.

Writes ``<out>/<cell>/`` (the run's log and checkpoint, ``result.json``), then ``<out>/results.json`` (every
finished cell of the grid found in ``<out>``) and ``<out>/results.md``: rows are methods, columns the models, each
value our test error (%) at the run's last evaluation, with the paper's value in a row beside ours. The paper's
numbers were not in this project's offline material, so those rows read "n/a (not in the offline material)":
fill ``PAPER_TEST_ERROR`` from the paper, never from memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..train import CheckpointError
from . import mnist
from .cli import mnist_main, require_positive

FCN_LAYERS = (3, 4, 5, 6)
# column -> the mnist command line's model flags
COLUMNS = {**{f"fcn{n}": ["--model", "fcn-bn", "--hidden-layers", str(n)] for n in FCN_LAYERS}, "cnn": ["--model", "cnn"]}
HEADERS = {**{f"fcn{n}": f"FCN {n}" for n in FCN_LAYERS}, "cnn": "CNN"}
CELLS = tuple(f"{column}-{method}" for method in mnist.MODES for column in COLUMNS)
# (method, column) -> the paper's test error (%), Table 1; empty: the table was not in the offline material.
PAPER_TEST_ERROR: dict[tuple[str, str], float] = {}
PAPER_MISSING = "n/a (not in the offline material)"


def _cells(patterns: Sequence[str]) -> list[str]:
    """The grid's cells that ``patterns`` name, in grid order; an error names a pattern that matches none."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(cell, pattern) for cell in CELLS):
            raise ValueError(f"--cells: {pattern!r} matches no cell of {', '.join(CELLS)}")
    return [cell for cell in CELLS if any(fnmatch.fnmatchcase(cell, p) for p in patterns)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdni.experiments.mnist_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=["*"], help="cells to run, names or shell patterns (default: all)")
    p.add_argument("--steps", type=int, default=mnist.DEMO["steps"], help="training steps per cell (default: the demo's)")
    p.add_argument("--eval-every", type=int, default=mnist.DEMO["eval_every"], help="steps between test evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="datasets folder (holding mnist/) or the mnist folder")
    p.add_argument("--out", type=Path, default=Path("runs/mnist_table"), help="output folder (default runs/mnist_table)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints of a cell (0: none)")
    p.add_argument("--resume", action="store_true",
                   help="skip cells whose result is in --out, continue the others from their checkpoints")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    require_positive(p, args, ("steps", "eval_every"))
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every: expected >= 0, got {args.checkpoint_every}")
    try:
        args.cells = _cells(args.cells)
    except ValueError as err:
        p.error(str(err))
    return args


def cell_config(args: argparse.Namespace, cell: str) -> mnist.RunConfig:
    """The run behind ``cell``: the mnist command line's own defaults for that model and method."""
    column, method = cell.split("-")
    cell_args = mnist.parse_args(COLUMNS[column] + ["--modes", method, "--steps", str(args.steps),
                                                    "--eval-every", str(args.eval_every), "--seed", str(args.seed)])
    return mnist.config_for(cell_args, method)


def run_cell(args: argparse.Namespace, data, cell: str) -> Optional[dict]:
    """Train ``cell`` (or, with ``--resume``, take its finished result); its result row, None if skipped."""
    config = cell_config(args, cell)
    out = args.out / cell
    result_path = out / "result.json"
    if args.resume and result_path.exists():
        row = json.loads(result_path.read_text())
        wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # as JSON keeps it: tuples become lists
        if row["config"] != wanted:
            raise CheckpointError(f"{result_path}: written for a different run ({row['config']}), not {wanted}; "
                                  "use another --out or drop --resume")
        print(f"{cell}: done before, test error {row['test_error']:.2f}% (skipped)", flush=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    row = mnist.run(config, data, out, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                    resume=args.resume, progress=not args.no_progress)
    row["cell"] = cell
    result_path.write_text(json.dumps(row, indent=2))
    print(f"{cell}: test error {row['test_error']:.2f}% after {config.steps} steps", flush=True)
    return row


def finished_cells(out: Path) -> dict[str, dict]:
    """Every grid cell with a result in ``out``, in grid order (also those this invocation did not run)."""
    return {cell: json.loads((out / cell / "result.json").read_text())
            for cell in CELLS if (out / cell / "result.json").exists()}


def markdown_table(rows: dict[str, dict]) -> str:
    """Rows: each method (ours) and the paper's value beside it; columns: FCN 3..6, CNN; test error (%)."""
    lines = ["| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method in mnist.MODES:
        ours = [f"{rows[f'{c}-{method}']['test_error']:.2f}" if f"{c}-{method}" in rows else "not run" for c in COLUMNS]
        paper = [f"{PAPER_TEST_ERROR[method, c]:.2f}" if (method, c) in PAPER_TEST_ERROR else PAPER_MISSING for c in COLUMNS]
        lines.append(f"| {method} (ours) | " + " | ".join(ours) + " |")
        lines.append(f"| {method} (paper) | " + " | ".join(paper) + " |")
    steps = sorted({row["steps"] for row in rows.values()})
    budget = (f"{steps[0]} training steps per cell" if len(steps) == 1 else
              f"cells trained for {steps} steps: see results.json" if steps else "no cell finished yet")
    return "\n".join(lines) + f"\n\nMNIST test error (%) at the last evaluation; {budget}.\n"


@mnist_main(parse_args)
def main(args: argparse.Namespace, data) -> int:
    for cell in args.cells:
        try:
            run_cell(args, data, cell)
        except CheckpointError as err:
            print(f"error: {cell}: {err}", file=sys.stderr)
            return 2
    rows = finished_cells(args.out)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (args.out / "results.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
