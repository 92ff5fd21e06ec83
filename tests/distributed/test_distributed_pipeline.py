"""The decoupled pipeline across processes (gloo on loopback): training and the baselines through
torchrun, resume, and failures: a killed rank, a hung rank, a wrong tensor shape.

Each launch starts K Python processes, so the runs are tiny (synthetic data, a few micro-batches).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdni.train.checkpoint import load_checkpoint

SMALL = ["--data", "synthetic", "--hidden-layers", "3", "--width", "32", "--micro-batch-size", "16",
         "--micro-batches", "2", "--threads", "1"]
LAUNCH_TIMEOUT = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, args: list, out: Path, rank_args: dict = None) -> list[subprocess.Popen]:
    """One process per rank, wired as torchrun would (env://), each rank's output in out/rank<k>.log."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w")
        cmd = [sys.executable, "-m", "fastdni.experiments.pipeline", *args, "--out", str(out),
               *(rank_args or {}).get(rank, [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, timeout=LAUNCH_TIMEOUT) -> list:
    """Exit codes of every process (None for one still running at the deadline, which is then killed)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


def logs(out: Path, world_size: int) -> list[str]:
    return [(out / f"rank{r}.log").read_text() for r in range(world_size)]


def test_two_ranks_with_torchrun_all_modes(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "fastdni.experiments.pipeline", *SMALL, "--steps", "12",
           "--modes", "dni", "gpipe", "1f1b", "backprop", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"cdni", "gpipe", "1f1b", "backprop"} and results["world_size"] == 2
    for row in rows.values():
        assert row["samples"] == 12 * 2 * 16 and row["train_seconds"] > 0
        assert row["test_error"] < 85.0, row  # chance is 90%: every mode learned something in 12 steps
    cdni = rows["cdni"]
    # Every micro-batch's target came back to stage 0: applied, or dropped as older than --max-staleness.
    assert cdni["targets_applied"][0] + cdni["targets_dropped"][0] == 24 and cdni["targets_applied"][0] > 0
    assert 0 <= cdni["staleness_mean"][0] <= cdni["staleness_max"][0] <= 8
    assert "| cdni |" in (out / "table.md").read_text() and (out / "curves.png").stat().st_size > 0


def test_four_ranks_killed_rank_stops_everyone_then_resume(tmp_path):
    out = tmp_path / "run"
    timeout = 6.0  # above the longest stall a loaded 2-core CI machine gives a healthy rank
    args = [*SMALL, "--modes", "dni", "--steps", "40", "--checkpoint-every", "4", "--timeout", str(timeout)]
    # Rank 2 is SIGKILLed before its 50th micro-batch (batch 25): checkpoints of batch 24 exist by then.
    procs = launch(4, [*args, "--fault", "2:50:exit"], out)
    started = time.monotonic()
    codes = wait_all(procs)
    elapsed = time.monotonic() - started
    text = logs(out, 4)
    assert codes[2] == -9, text[2]
    for rank in (0, 1, 3):
        assert codes[rank] == 1, f"rank {rank} exit {codes[rank]}:\n{text[rank]}"
        assert "rank 2" in text[rank] and "error" in text[rank], text[rank]
    assert elapsed < LAUNCH_TIMEOUT
    # Every checkpoint file left is complete; the newest step all four stages share is resumable.
    folder = out / "checkpoints"
    files = sorted(folder.glob("*.pt"))
    assert not list(folder.glob("*.tmp")), files
    steps_by_rank = [{load_checkpoint(f)["step"] for f in folder.glob(f"stage{r}-*.pt")} for r in range(4)]
    common = set.intersection(*steps_by_rank)
    assert common and max(common) >= 8, steps_by_rank
    assert max(common) < 50

    codes = wait_all(launch(4, [*args, "--resume"], out))
    text = logs(out, 4)
    assert codes == [0, 0, 0, 0], "\n".join(text)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["resumed_from"] == max(common)
    assert rows[0]["samples"] == (80 - max(common)) * 16
    assert len(rows[0]["staleness_mean"]) == 3
    assert rows[0]["test_error"] < 85.0


def test_hung_rank_is_named_and_others_exit_within_timeout(tmp_path):
    out = tmp_path / "run"
    timeout = 3.0
    procs = launch(2, [*SMALL, "--modes", "dni", "--steps", "40", "--timeout", str(timeout), "--fault", "1:6:hang"], out)
    started = time.monotonic()
    codes = wait_all(procs[:1])  # rank 1 sleeps until killed
    elapsed = time.monotonic() - started
    hung_alive = procs[1].poll() is None
    wait_all([procs[1]], timeout=0.1)
    text = logs(out, 2)
    assert hung_alive
    assert codes == [1], text[0]
    assert "rank 1 died or hung (no heartbeat for" in text[0], text[0]
    assert elapsed < 60, elapsed


def test_wrong_activation_shape_fails_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    # Rank 1 is configured with a different width: its block expects 48 features, rank 0 sends 32.
    procs = launch(2, [*SMALL, "--modes", "dni", "--steps", "5", "--timeout", "5"], out, rank_args={1: ["--width", "48"]})
    codes = wait_all(procs)
    text = logs(out, 2)
    assert codes == [1, 1], "\n".join(text)
    expected = "activation has shape [16, 32], expected [batch, 48]"
    assert "TRAIN message 0 from rank 0" in text[1] and expected in text[1], text[1]
    assert "rank 1 failed" in text[0] and expected in text[0], text[0]
