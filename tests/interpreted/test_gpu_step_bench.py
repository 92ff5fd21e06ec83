"""benchmarks/gpu_step.py end to end on one tiny row per SG kind: equal-work check, launch counts, timing,
JSON and markdown. Under TRITON_INTERPRET=1 (CI, ``--device cpu``) the times are the interpreter's; with
FASTDNI_TEST_DEVICE=cuda (benchmarks/gpu.sh) the same row runs on the GPU, torch.compile included."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from conftest import DEVICE

BUILDS_ON_CPU = True  # the benchmark seeds its problems on the CPU and moves them itself
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_step  # noqa: E402

BATCH, WIDTH = 8, 32


def test_quick_rows_report_checked_times_and_launches(tmp_path):
    json_path, md_path = tmp_path / "step.json", tmp_path / "step.md"
    rc = gpu_step.main(["--quick", "--device", DEVICE.type, "--batch", str(BATCH), "--width", str(WIDTH),
                           "--json", str(json_path), "--markdown", str(md_path)])
    report = json.loads(json_path.read_text())
    rows = report["rows"]
    assert rc == 0, [r.get("error") for r in rows]
    assert report["device"] and report["torch"] and report["triton"]
    assert [(r["sg"], r["dtype"], r["batch"], r["width"]) for r in rows] == [(sg, "fp32", BATCH, WIDTH) for sg in ("linear", "mlp")]
    timed = {"triton", "eager", "gemm_floor"} | ({"compiled"} if DEVICE.type == "cuda" else set())  # --quick on CPU skips compiled
    timed |= {"cuda"} if gpu_step.has_cuda_backend(DEVICE) else set()  # the CUDA C++ backend beside Triton
    for row in rows:
        assert row["status"] == "ok" and row["check"]["ok"]
        assert set(row["ms"]) == timed and all(math.isfinite(t) and t > 0 for t in row["ms"].values())
        assert all(row["ratios"][f"triton/{name}"] > 0 for name in timed - {"triton"})
        assert row["triton_GBps"] > 0 and row["triton_TFLOPs"] > 0
        # the cost model's launch plan is what the Triton path launches (5 linear, 8 mlp)
        assert row["launches"]["triton"]["total"] == row["model"]["fastdni_launches"], row["launches"]["triton"]
        assert row["launches"]["eager"]["total"] > row["launches"]["triton"]["total"]
        if "cuda" in timed:
            assert row["check_cuda"]["ok"] and row["ratios"]["cuda/gemm_floor"] > 0 and row["launches"]["cuda"]["total"] > 0
        assert set(row["targets"]) == set(gpu_step.TARGETS)
    table = md_path.read_text()
    assert table.count("\n| linear | fp32 |") == 1 and table.count("\n| mlp | fp32 |") == 1
