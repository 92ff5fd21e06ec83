"""benchmarks/cost_model.py against what the step's code does: its FLOPs are those FlopCounterMode counts in the
eager step, its eager launches and bytes those of the ops the eager step dispatches (profiled and traced), and
its compulsory and Triton-path bytes the hand counts of a tiny case."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import common  # noqa: E402
import cost_model as cm  # noqa: E402

TINY = dict(batch=8, width=16)
GRID = cm.grid()


@pytest.mark.parametrize("sg", common.SG_KINDS)
def test_flops_are_the_eager_steps(sg):
    step = cm.Step(**TINY, sg=sg)
    run = cm.eager_step(step)
    with FlopCounterMode(display=False) as counter:
        run()
    assert cm.flops(step) == counter.get_total_flops() == common.step_flops(common.make_problem(TINY["batch"], TINY["width"], sg))
    assert cm.flops(step) == 2 * 8 * 16 * 16 * (5 if sg == "linear" else 8)


def test_compulsory_bytes_by_hand():
    # B = 2, W = 3, linear SG: x, target, h, dx are 6 elements each; W, b, A, c are 24 parameters, each read and
    # written with its two moments (6 accesses); the loss is 4 bytes.
    assert cm.compulsory_bytes(cm.Step(2, 3, "linear", "fp32")) == 4 * (4 * 6 + 6 * 24) + 4 == 676
    assert cm.compulsory_bytes(cm.Step(2, 3, "linear", "bf16")) == 2 * (4 * 6 + 6 * 24) + 4
    assert cm.compulsory_bytes(cm.Step(2, 3, "mlp", "fp32")) == 4 * (4 * 6 + 6 * 36) + 4  # A1, c1, A2, c2: 36


@pytest.mark.parametrize("sg", common.SG_KINDS)
def test_compulsory_bytes_match_the_cpu_benchmarks(sg):
    problem = common.make_problem(TINY["batch"], TINY["width"], sg)
    assert cm.compulsory_bytes(cm.Step(**TINY, sg=sg)) == common.compulsory_bytes(problem) + cm.LOSS_BYTES


def test_fastdni_bytes_by_hand():
    # B = 2, W = 3, linear SG, fp32, in elements: forward x 6 + W 9 + b 3 + h 6 = 24, SG h 6 + A 9 + c 3 + pred 6 = 24;
    # dx: pred 6 + h 6 + W 9 + dx 6 = 27; W step: pred 6 + h 6 + x 6 + (W, b and moments) 2 * 3 * 12 = 90;
    # A step: pred 6 + target 6 + h 6 + 72 = 90. Bytes: 4 per element, plus the loss, written once: 4.
    assert cm.fastdni_bytes(cm.Step(2, 3, "linear", "fp32")) == 4 * (24 + 24 + 27 + 90 + 90) + 4 == 1024


@pytest.mark.parametrize("sg, launches", [("linear", 5), ("mlp", 8)])
def test_fastdni_launch_plan(sg, launches):
    assert all(cm.fastdni_launches(s) == launches for s in GRID if s.sg == sg)
    names = [k.name for k in cm.fastdni_kernels(cm.Step(**TINY, sg=sg))]
    assert sum(n.startswith("forward") for n in names) == (2 if sg == "linear" else 3)
    assert sum("Adam" in n for n in names) == (2 if sg == "linear" else 3)  # one weight-gradient GEMM per weight


@pytest.mark.parametrize("step", GRID, ids=str)
def test_fastdni_moves_at_least_the_compulsory_bytes(step):
    need, fast = cm.compulsory_bytes(step), cm.fastdni_bytes(step)
    assert need <= fast <= cm.fastdni_bytes(step, pessimistic=True)
    assert fast < cm.eager_bytes(step)
    assert cm.roofline_s(step) >= cm.compulsory_bytes(step) / cm.H100_SXM.hbm


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("sg", common.SG_KINDS)
def test_eager_model_is_the_eager_steps_ops(sg, dtype):
    """Launches: the ATen ops with work that torch.profiler sees; bytes: a dispatch trace of the same step."""
    step = cm.Step(**TINY, sg=sg, dtype=dtype)
    run = cm.eager_step(step)
    assert sum(cm.profiled_kernels(run).values()) == cm.eager_launches(step) == (24 if sg == "linear" else 32)
    traced, model = cm.traced_kernels(run), cm.eager_kernels(step)
    assert [k.name for k in traced] == [f"aten::{k.name.split(':')[0]}" for k in model]
    assert [k.bytes() for k in traced] == [k.bytes() for k in model]


def test_step_arguments_are_checked():
    with pytest.raises(ValueError, match="batch"):
        cm.Step(0, 16)
    with pytest.raises(ValueError, match="sg"):
        cm.Step(8, 16, "conv")
    with pytest.raises(ValueError, match="dtype"):
        cm.Step(8, 16, "linear", "int8")
    assert cm.Step(8, 16, "linear", torch.bfloat16).dtype == "bf16"


def test_peak_for_device_names():
    assert cm.peak_for("NVIDIA H100 80GB HBM3") is cm.H100_SXM
    assert cm.peak_for("NVIDIA H100 PCIe") is cm.H100_PCIE
    assert cm.peak_for("NVIDIA H200") is cm.H200


def test_table_prints(capsys):
    assert cm.main(["--batch", "64", "--width", "256", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert out.count("linear") >= 2 and "eager launches, mlp SG: model 32, profiled on CPU 32" in out
