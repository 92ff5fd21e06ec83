"""Results tables (Markdown) and learning-curve plots shared by the experiments."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def results_table(rows: Sequence[dict]) -> str:
    """A Markdown table: final test error, gap to backprop, time per step and its ratio to backprop."""
    base = next((r for r in rows if r["mode"] == "backprop"), None)
    lines = ["| mode | steps | test error (%) | vs backprop (pp) | ms / step | step cost vs backprop |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['test_error'] - base['test_error']:+.2f}" if base else "n/a"
        cost = f"{r['ms_per_step'] / base['ms_per_step']:.2f}x" if base else "n/a"
        lines.append(f"| {r['mode']} | {r['steps']} | {r['test_error']:.2f} | {gap} | {r['ms_per_step']:.1f} | {cost} |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict], path: Path, *, title: str) -> None:
    """Test error against steps, one line per mode, log-scaled error axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if r["curve"]:
            steps, errors = zip(*r["curve"])
            ax.plot(steps, errors, label=r["mode"])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training step")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
