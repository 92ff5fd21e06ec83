"""The benchmark of one DNI layer step (``benchmarks/dni_step.py``) compares equal work.

Its variants (``benchmarks/common.py``) must compute the same step: ``fused`` (the C++ ops),
``eager`` (explicit gradients + ``torch.optim.Adam``) and ``compiled`` (``torch.compile`` of eager)
the same parameter updates and outputs after one step, and ``gemm_floor`` the same GEMMs as the
eager step (counted by ``FlopCounterMode``). Plus one tiny row of the script's own logic (what
``--quick`` runs), timing nothing meaningful.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastdni.ops as ops

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import dni_step  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="fastdni._C (the fused CPU kernels) did not load")

BATCH, WIDTH = 8, 16
UPDATE_TOL = dict(rtol=1e-4, atol=1e-7)  # Adam updates are ~lr = 1e-3: atol is 1e-4 of a step
OUTPUT_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, different GEMM blocking


def _assert_same_step(problem: common.Problem, got: common.Variant, got_out, want: common.Variant, want_out) -> None:
    assert len(got.params) == len(want.params) == len(problem.params)
    for i, (g, w, p0) in enumerate(zip(got.params, want.params, problem.params)):
        assert not torch.equal(w, p0), f"{want.name} did not update parameter {i}"
        torch.testing.assert_close(g.detach() - p0, w - p0, **UPDATE_TOL, msg=lambda m, i=i: f"{got.name} param {i}: {m}")
    for name, g, w in zip(("h", "dx", "loss"), got_out, want_out):
        torch.testing.assert_close(g.detach(), w, **OUTPUT_TOL, msg=lambda m, name=name: f"{got.name} {name}: {m}")


@pytest.mark.parametrize("sg", common.SG_KINDS)
def test_eager_matches_fused_and_gemm_floor_has_its_flops(sg):
    problem = common.make_problem(BATCH, WIDTH, sg)
    fused, eager, raw, floor = (common.make_variant(n, problem) for n in ("fused", "eager", "fused_raw", "gemm_floor"))
    fused_out = fused.step()
    with FlopCounterMode(display=False) as eager_flops:
        eager_out = eager.step()
    _assert_same_step(problem, eager, eager_out, fused, fused_out)
    _assert_same_step(problem, raw, raw.step(), fused, fused_out)
    with FlopCounterMode(display=False) as floor_flops:
        floor.step()
    assert eager_flops.get_total_flops() == floor_flops.get_total_flops() == common.step_flops(problem)


def test_dni_step_row_compiled_matches_fused():
    """One row of ``dni_step.py``'s logic; its first-step check compares eager and compiled with fused."""
    try:
        row = dni_step.run_row(BATCH, WIDTH, "mlp", reps=1, min_block_s=0.0, budget_s=0.0, bandwidth=1e10)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler for Inductor here
        pytest.skip(f"torch.compile cannot compile here: {error}")
    assert set(row["errors"]) == {"eager", "compiled"}
    assert row["max_err"] < dni_step.MATCH_TOL, row["errors"]
    assert set(row["time"]) == set(common.VARIANTS) and all(t > 0 for t in row["time"].values())
    assert row["flops"] == common.step_flops(common.make_problem(BATCH, WIDTH, "mlp"))
    assert row["memory"]["fused"] is None or row["memory"]["fused"] > 0
    assert set(row["targets"]) == {"floor", "2x", "comp"}
    table = dni_step.markdown([row], "header")
    assert table.count("\n|") == 3 and "mlp" in table


def test_compiled_step_matches_fused():
    problem = common.make_problem(BATCH, WIDTH, "linear")
    fused = common.make_fused(problem)
    torch._dynamo.reset()
    compiled = common.make_compiled(problem)
    try:
        compiled_out = compiled.step()
    except torch._dynamo.exc.BackendCompilerFailed as error:
        pytest.skip(f"torch.compile cannot compile here: {error}")
    _assert_same_step(problem, compiled, compiled_out, fused, fused.step())
    assert all(p.grad is None for p in compiled.params)  # the step ends with zero_grad(set_to_none=True)


def test_dni_sg_step_row_checks_equal_work():
    """One row of ``dni_sg_step.py`` (the SG step of fastdni.nn.DNI, fused against autograd), fp64, no torch.compile:
    the variants agree; a variant doing other work (twice the learning rate) is caught by the same check."""
    import dni_sg_step

    opts = dni_sg_step.parse_args(["--skip", "compiled", "--reps", "1"])
    row = dni_sg_step.run_row(8, "2x3x3", "mlp", "fp64", torch.device("cpu"), opts)
    assert set(row["ms"]) == {"fused", "eager"} and all(c["ok"] for c in row["check"].values()), row["check"]
    problem = dni_sg_step.make_problem(8, (18,), "linear", torch.float64, torch.device("cpu"))
    other = dni_sg_step.make_eager(problem)
    for group in other.optimizer.param_groups:
        group["lr"] *= 2
    check = dni_sg_step.check_equal_step(problem, {"fused": dni_sg_step.make_fused(problem), "eager": other},
                                         dni_sg_step.CHECK_TOL["fp64"])
    assert not check["eager"]["ok"]



def test_copy_lstm_step_row_checks_equal_work(capsys):
    """One tiny row of ``bench_copy_lstm_step.py`` (the copy-task LSTM + TruncationDNI step), no torch.compile: fused
    and eager agree in fp64 and fp32 after a few windows, and the table prints. The hand-counted SG GEMM FLOPs are
    what FlopCounterMode sees the eager step do beyond the same step without the SG (the LSTM's own kernel it does
    not see, in either)."""
    from torch.utils.flop_counter import FlopCounterMode

    import bench_copy_lstm_step as bench

    args = ["--hidden", "8", "-T", "2", "--batch-size", "4", "--skip", "compiled", "--reps", "1", "--budget", "0",
            "--min-block", "0", "--windows", "4", "--check-steps", "3"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| 8 | 2 | 4 |" in out and "ok: eager fp64" in out
    windows, channels = bench.make_windows(8, 2, 4, 1, torch.float32, torch.device("cpu"))
    flops = {}
    for kind in ("eager", "bptt"):
        step = bench.make_step(bench.Model(kind, 8, 4, channels, torch.float32, torch.device("cpu")))
        with FlopCounterMode(display=False) as counter:
            step(*windows[0])
        flops[kind] = counter.get_total_flops()
    assert flops["eager"] - flops["bptt"] == bench.gemm_flops(8, 2, 4, channels)["sg"]


def test_copy_lstm_step_check_catches_other_work():
    """The fp64 check of the benchmark is not vacuous: an eager SG with twice the learning rate is caught."""
    import bench_copy_lstm_step as bench

    device = torch.device("cpu")
    windows, channels = bench.make_windows(8, 2, 4, 3, torch.float64, device)
    fused, eager = (bench.Model(k, 8, 4, channels, torch.float64, device) for k in ("fused", "eager"))
    for group in eager.sg_opt.param_groups:
        group["lr"] *= 2
    start = [p.detach().clone() for p in fused.parameters()]
    for m in (fused, eager):
        step = bench.make_step(m)
        for w in windows:
            step(*w)
    assert bench.max_rel_diff(eager, fused, start) > bench.CHECK_TOL


@pytest.mark.parametrize("script, args, row_start, title", [
    ("fcn_bn_step", ["--batch", "16", "--width", "32", "--mode", "cdni"], "16 | 32 | cdni |", "fcn-bn training step"),
    ("bench_cnn_step", ["--batch", "4", "--mode", "dni", "--budget", "0"], "4 | dni |", "cnn training step"),
])
def test_whole_step_benchmarks_print_checked_times_and_memory(script, args, row_start, title, capsys, tmp_path):
    """One small row of ``fcn_bn_step.py`` and ``bench_cnn_step.py`` (no torch.compile), ``--device cpu`` (the device
    the internal functions take; ``--device cuda`` runs the same path there, in benchmarks/gpu.sh): every variant
    agrees with ``fused`` after one step, and the row has a time and a peak memory per variant under the shared
    header, in the printed table, the markdown and the JSON."""
    import json

    bench = __import__(script)
    markdown, report = tmp_path / "table.md", tmp_path / "rows.json"
    assert bench.main([*args, "--device", "cpu", "--skip", "compiled", "--reps", "1", "--markdown", str(markdown), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" | ".join(bench.HEADER) + "\n")  # no device lines before the header on the CPU
    line = next(ln for ln in out.splitlines() if ln.startswith(row_start))
    cells = line.split(" | ")
    assert len(cells) == len(bench.HEADER) and cells[-1] == "ok"
    for name in ("fused", "eager"):
        assert float(cells[bench.HEADER.index(f"{name} ms")]) > 0
        assert float(cells[bench.HEADER.index(f"mem {name} MB")]) > 0
    assert cells[bench.HEADER.index("compiled ms")] == "-" and "mem eager/fused" in markdown.read_text()
    title = f"{title} on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    assert markdown.read_text().startswith(f"# {title}\n")
    written = json.loads(report.read_text())
    assert written["title"] == title and written["notes"] == []
    (row,) = written["rows"]
    assert bench.format_row(row) == cells  # the JSON row is the printed one
    assert "compiled" not in row["ms"] and all(row["ms"][n] > 0 and row["memory"][n] > 0 for n in ("fused", "eager"))


def test_fcn_bn_and_cnn_step_device_helpers_on_the_cpu():
    """The device-dependent pieces of the whole-step benchmarks (``common.py``) on the CPU: nothing to prepare, the
    title's ``CPU (n threads)``, times from ``time_interleaved`` and the c10 CPU allocator's peak."""
    device = torch.device("cpu")
    assert common.prepare_whole_step(device) == []
    assert common.device_name(device) == f"CPU ({torch.get_num_threads()} threads)"
    x = torch.ones(1000)
    ms = common.step_times_ms({"mul": lambda: x * 2, "add": lambda: x + 1}, device, 1, 0.0, 0.0)
    assert set(ms) == {"mul", "add"} and all(t > 0 for t in ms.values())
    peak = common.peak_step_bytes(lambda: x * 2, device)
    assert peak is None or peak >= x.nbytes
