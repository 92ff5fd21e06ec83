"""One training step of the MNIST CNN (``--model cnn``): fused ops against autograd and torch.compile, with memory.

Usage::

    python benchmarks/bench_cnn_step.py --quick               # B 64, cdni, fp32
    python benchmarks/bench_cnn_step.py --threads 1 --markdown docs/benchmarks/cnn_step_cpu.md   # B 64/256 x modes
    python benchmarks/bench_cnn_step.py --device cuda --json out.json --markdown out.md          # the same on a GPU

The model is ``fastdni.experiments.mnist``'s (``build_model``): ``1x28x28 -> [Conv5x5 -> BatchNorm2d -> ReLU ->
MaxPool2 -> conv SG] x (32, 64 channels) -> Linear -> 10``, Adam (lr 1e-3) everywhere, ``gradient_scale = B``; dni
with the experiment's MLP conv SG (a hidden 5x5 conv of 64 channels; on autograd in every variant, see
``fastdni.nn.fused_cnn.MLP_CONV_SG``), cdni with its linear conv SG and per-position label map (on the ops in
``fused``), backprop without SGs. One step is ``train_step`` on a random batch: every block's forward, SG prediction
and update, every SG's regression, the classifier's step. As in ``benchmarks/fcn_bn_step.py`` the SGs' zero output
convs are ``0.01 * randn`` and every Adam state starts mid-training (step 10, small random moments), identically for
every variant.

Variants (each a copy of the same model and Adam state, updated on every call):

- ``fused``: ``DecoupledCNN(backend="auto")``, the default of ``--model cnn`` (``weight_grad="aten"``): the conv
  weight gradients from ATen's ``convolution_backward`` (with ``dx``, one call), stepped by the optimizer's own
  ``step()``; BatchNorm, the SG steps and the classifier on the ops;
- ``fused_gemm``: the same with ``weight_grad="gemm"``: each conv's weight step the ops' GEMM over the unfolded
  input, the optimizer in its epilogue;
- ``eager``: ``DecoupledSequential`` over ``cnn_blocks`` (autograd, ``DNI`` interfaces, ``Adam.step()``): what
  ``--backend autograd`` runs;
- ``compiled``: the same, each block and SG model under ``torch.compile`` (Inductor; the step around them, with the
  interfaces' ``backward`` calls, is not one graph).

Each row is checked first (one step of each variant from the same state): the loss and every parameter update
against ``fused``'s, relative to the largest update (``CHECK_TOL``). Times: medians over interleaved repetitions
(``benchmarks/dni_step.py``'s ``time_interleaved``); memory: the peak c10 allocation of one step on top of what it
started with (``benchmarks/common.py``'s ``peak_alloc_bytes``, from ``torch.profiler``), plus, for the fused
variants, the unfold workspace they keep between steps.

``--device cuda`` (``benchmarks/gpu.sh``): as ``benchmarks/fcn_bn_step.py``'s: the models (built on the CPU) and the
data on the GPU, ``fused`` and ``fused_gemm`` on ``backend="auto"`` there (``common.prepare_whole_step``), fp32 IEEE
in every variant (TF32 off, cuDNN's convolutions included), the same fp32 check at ``CHECK_TOL``, times from
``triton.testing.do_bench``, memory from ``torch.cuda.max_memory_allocated`` (``common.peak_step_bytes``; the fused
variants' workspace added as on the CPU). ``--json`` writes the title and the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from fastdni.experiments import mnist  # noqa: E402
from fastdni.nn import DecoupledCNN  # noqa: E402

BATCHES = (64, 256)
MODES = ("dni", "cdni", "backprop")
QUICK = dict(batch=(64,), mode=("cdni",))
#: fp32, one step, on each tensor's update norm (the docstring of check_equal_step)
CHECK_TOL = 2e-2
COLUMNS = ("fused", "fused_gemm", "eager", "compiled")


@dataclasses.dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: Callable[[], object]


def build(batch: int, mode: str, backend: str, device: torch.device, weight_grad: str = "aten") -> torch.nn.Module:
    """``--model cnn``'s model for ``mode`` (``backend="autograd"``: DecoupledSequential), built on the CPU (the same
    values on any device), moved to ``device``, mid-training."""
    config = mnist.RunConfig(mode=mode, steps=1, lr=1e-3, sg_lr=1e-3, lr_schedule="constant", model="cnn",
                             batch_size=batch, sg_hidden=(64,) if mode == "dni" else (), backend=backend)
    model = mnist.build_model(config).to(device)
    if isinstance(model, DecoupledCNN):
        model.weight_grad = weight_grad
    _mid_training(model)
    return model


def _sg_params(model: torch.nn.Module) -> list[torch.Tensor]:
    if isinstance(model, DecoupledCNN):
        return list(model.synthetic_gradients.parameters()) if model.mode == "dni" else []
    return [p for interface in model.interfaces or () for p in interface.parameters()]


def _all_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter (conv W, b, gamma, beta per block, the classifier's, the SGs'), one order for both kinds."""
    if isinstance(model, DecoupledCNN):
        blocks = [p for conv, norm in zip(model.convs, model.norms) for p in (*conv.parameters(), *norm.parameters())]
        return blocks + list(model.head.parameters()) + _sg_params(model)
    return list(model.blocks.parameters()) + _sg_params(model)


def _mid_training(model: torch.nn.Module) -> None:
    """Zero SG convs to ``0.01 * randn`` and Adam at step 10 with small random moments, seeded per parameter index
    (drawn on the CPU: the same values on any device; ``step`` stays a CPU tensor, as Adam keeps it)."""
    optimizers = [o for o in (*model.optimizers, *model.sg_optimizers) if o is not None]
    sg_params = {id(p) for p in _sg_params(model)}
    for i, p in enumerate(_all_params(model)):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            if id(p) in sg_params and not p.any():
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        opt = next(o for o in optimizers if any(q is p for g in o.param_groups for q in g["params"]))
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": (1e-3 * torch.randn(p.shape, generator=gen)).to(p.device),
                        "exp_avg_sq": (1e-6 * torch.rand(p.shape, generator=gen)).to(p.device)}


def make_variants(batch: int, mode: str, skip: set[str], notes: list[str], device: torch.device) -> dict[str, Variant]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    context = y if mode == "cdni" else None
    fused, fused_gemm = build(batch, mode, "auto", device), build(batch, mode, "auto", device, "gemm")
    eager = build(batch, mode, "autograd", device)
    variants = {"fused": Variant("fused", fused, lambda: fused.train_step(x, y, F.cross_entropy, context)),
                "fused_gemm": Variant("fused_gemm", fused_gemm,
                                      lambda: fused_gemm.train_step(x, y, F.cross_entropy, context)),
                "eager": Variant("eager", eager, lambda: eager.train_step(x, y, F.cross_entropy, context))}
    if "compiled" not in skip:
        torch._dynamo.reset()  # each row compiles new modules: without it the recompile limit drops later rows to eager
        compiled = build(batch, mode, "autograd", device)
        try:
            for i, block in enumerate(compiled.blocks):
                compiled.blocks[i] = torch.compile(block, dynamic=False)
            for interface in compiled.interfaces or ():
                interface.synthetic_gradient = torch.compile(interface.synthetic_gradient, dynamic=False)
            variants["compiled"] = Variant("compiled", compiled, lambda: compiled.train_step(x, y, F.cross_entropy, context))
        except Exception as error:  # noqa: BLE001  e.g. no C++ compiler for Inductor
            notes.append(f"compiled: {type(error).__name__}: {error}")
    return variants


CHANNELS = mnist.RunConfig.cnn_channels  #: the conv blocks' channels (W, b, gamma, beta each in _all_params)


def check_equal_step(variants: dict[str, Variant]) -> dict:
    """One step of every variant from the same state: the loss, and every parameter's update against ``fused``'s
    in norm. Not element by element: where fp32 rounding puts a BatchNorm output on the other side of the ReLU's 0
    (or changes a max pool's winner), that position's gradient differs whole (measured: 7 of the 51,200 elements of
    the second conv's weight update, 0.7% of its norm, between fused and eager at B=64, cdni; in fp64 the same step
    agrees to 1e-13, and tests/nn/test_fused_cnn.py compares 300-step curves there)."""
    starts = {name: [p.detach().clone() for p in _all_params(v.model)] for name, v in variants.items()}
    losses = {name: float(v.step().loss) for name, v in variants.items()}
    updates = {name: [p.detach() - p0 for p, p0 in zip(_all_params(v.model), starts[name])] for name, v in variants.items()}
    # Left out: the conv biases under a BatchNorm, whose true gradient is 0 (each variant steps them on its own
    # rounding noise).
    checked = [i for i, p in enumerate(_all_params(variants["fused"].model)) if i % 4 != 1 or i >= 4 * len(CHANNELS)]
    out = {}
    for name in variants:
        err = max(float((updates[name][i] - updates["fused"][i]).norm() / updates["fused"][i].norm().clamp_min(1e-30))
                  for i in checked)
        loss_err = abs(losses[name] - losses["fused"]) / abs(losses["fused"])
        out[name] = dict(update=err, loss=loss_err, ok=err <= CHECK_TOL and loss_err <= CHECK_TOL)
    return out


def run_row(batch: int, mode: str, opts: argparse.Namespace, device: torch.device) -> dict:
    row = dict(batch=batch, mode=mode, notes=[])
    variants = make_variants(batch, mode, set(opts.skip), row["notes"], device)
    row["check"] = check_equal_step(variants)  # also the warm-up (and the compilation) of every variant
    row["ms"] = common.step_times_ms({name: v.step for name, v in variants.items()}, device, opts.reps, 0.05,
                                     opts.budget)
    row["memory"] = {name: common.peak_step_bytes(v.step, device) for name, v in variants.items()}
    for name, v in variants.items():  # the unfold's workspace is kept between steps, but is the step's scratch
        if row["memory"].get(name) is not None and isinstance(v.model, DecoupledCNN):
            row["memory"][name] += v.model.workspace.nbytes
    return row


RATIOS = ("fused_gemm", "eager", "compiled")
HEADER = ["B", "mode", *common.step_row_header(COLUMNS, RATIOS)]


def format_row(row: dict) -> list[str]:
    return [str(row["batch"]), row["mode"], *common.step_row_cells(row, COLUMNS, RATIOS)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B 64, cdni only (smoke test)")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--skip", choices=("compiled",), action="append", default=[])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (default 7)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timing per row at most on the CPU (reps >= 5)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--markdown", metavar="PATH")
    common.add_whole_step_args(parser)
    opts = parser.parse_args(argv)
    device = common.bench_device(opts, "bench_cnn_step.py")
    if device is None:
        return 2
    notes = common.prepare_whole_step(device)
    title = f"cnn training step on {common.device_name(device)}, torch {torch.__version__}"
    rows = []
    for note in notes:  # none on the CPU
        print(note)
    print(" | ".join(HEADER))
    for mode, batch in itertools.product(opts.mode or (QUICK["mode"] if opts.quick else MODES),
                                         opts.batch or (QUICK["batch"] if opts.quick else BATCHES)):
        rows.append(run_row(batch, mode, opts, device))
        print(" | ".join(format_row(rows[-1])), *rows[-1]["notes"], flush=True)
        common.write_step_tables(opts, title, HEADER, rows, format_row, notes)  # every row: a stopped run keeps them
    return 0 if all(all(c["ok"] for c in r["check"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
