"""One training step of the paper's FCN with BatchNorm (``--model fcn-bn``): fused ops against autograd and torch.compile.

Usage::

    python benchmarks/fcn_bn_step.py --quick                 # B 256, width 256, dni (MLP SG), fp32
    python benchmarks/fcn_bn_step.py --markdown out.md       # B 64/256 x width 256/1024 x dni/cdni
    python benchmarks/fcn_bn_step.py --device cuda --json out.json --markdown out.md   # the same grid on a GPU

The model is ``fastdni.experiments.mnist``'s: ``784 -> [Linear -> BatchNorm1d -> ReLU -> SG] x 3 -> Linear -> 10``,
Adam (lr 1e-3) on every block and SG, ``gradient_scale = B``; dni with an MLP SG (one hidden layer as wide as the layer),
cdni with a linear SG on the labels. One step is ``train_step`` on a random batch: every layer's forward, SG
prediction and update, every SG's regression, the classifier's backprop step. As in ``benchmarks/common.py``, the
SG models' zero output layers are ``0.01 * randn`` (a trained SG; a zero one predicts 0) and every Adam state starts
mid-training (step 10, small random moments), identically for every variant.

Variants (each a copy of the same model and Adam state, updated on every call):

- ``fused``: ``DecoupledMLP(batch_norm=True, backend="auto")``: per hidden layer ``dni_forward`` (GEMM) ->
  ``batch_norm_act`` -> ``sg_predict``, ``batch_norm_act_update_`` -> ``dni_update_`` -> ``sg_regression_``;
- ``eager``: ``DecoupledSequential`` over ``nn.Sequential(Linear, BatchNorm1d, ReLU)`` blocks (autograd, ``DNI``
  interfaces, ``Adam.step()``): what ``--backend autograd`` runs;
- ``compiled``: the same, each block and SG model under ``torch.compile`` (the step itself, with its
  ``backward`` calls inside the interfaces, is not one graph).

Each row is checked first (one step of each variant from the same state): the loss and every parameter update
against ``fused``'s, relative to the largest update (``CHECK_TOL``). (From a fresh Adam state the check would be
moot: the Linears' biases before a BatchNorm have a true gradient of 0, and Adam's first step turns each variant's
rounding noise into a step of ~lr; docs/performance.md.)
Times: the median over interleaved repetitions (``benchmarks/dni_step.py``'s ``time_interleaved``); memory: the peak
bytes of one step above what it started with (``common.peak_alloc_bytes``, the c10 CPU allocator).

``--device cuda`` (``benchmarks/gpu.sh``): the models (built on the CPU, the same values) and the data on the GPU,
``fused`` on ``backend="auto"`` there (the CUDA C++ kernels where built, Triton's for the BatchNorm ops and where
not: ``common.prepare_whole_step``, which refuses a GPU without them), fp32 IEEE in every variant (TF32 off). The
check is the same fp32 one at ``CHECK_TOL`` (as on the CPU, and as ``bench_copy_lstm_step.py``'s fp32 check where the
CUDA kernels have no fp64); times: ``triton.testing.do_bench``; memory: ``torch.cuda.max_memory_allocated`` over one
step above what was allocated before it (``common.peak_step_bytes``). ``--json`` writes the title and the rows.
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
import torch._functorch.config  # noqa: E402  (donated_buffer, below)
import torch._inductor.config  # noqa: E402  (inplace_buffers, below)

import common  # noqa: E402
from fastdni.experiments import mnist  # noqa: E402

BATCHES = (64, 256)
WIDTHS = (256, 1024)
MODES = ("dni", "cdni")
QUICK = dict(batch=(256,), width=(256,), mode=("dni",))
CHECK_TOL = 1e-3  #: fp32, one step
COLUMNS = ("fused", "eager", "compiled")


@dataclasses.dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: Callable[[], object]


def make_models(batch: int, width: int, mode: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The fused and the autograd fcn-bn, same initialisation (``build_model`` with the same seed, on the CPU), moved
    to ``device``, mid-training."""
    config = mnist.RunConfig(mode=mode, steps=1, lr=1e-3, sg_lr=1e-3, lr_schedule="constant", model="fcn-bn", width=width,
                             batch_size=batch, sg_hidden=(width,) if mode == "dni" else ())
    models = (mnist.build_model(config).to(device),
              mnist.build_model(dataclasses.replace(config, backend="autograd")).to(device))
    for model in models:
        _mid_training(model)
    return models


def _mid_training(model: torch.nn.Module) -> None:
    """Zero SG layers to ``0.01 * randn`` and Adam at step 10 with small random moments, seeded per parameter index
    (drawn on the CPU: the same values on any device; ``step`` stays a CPU tensor, as Adam keeps it)."""
    optimizers = [o for o in (*model.optimizers, *model.sg_optimizers) if o is not None]
    sg_params = set(id(p) for p in _all_params(model)[-len(_sg_params(model)):])
    for i, p in enumerate(_all_params(model)):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            if id(p) in sg_params and not p.any():
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        opt = next(o for o in optimizers if any(q is p for g in o.param_groups for q in g["params"]))
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": (1e-3 * torch.randn(p.shape, generator=gen)).to(p.device),
                        "exp_avg_sq": (1e-6 * torch.rand(p.shape, generator=gen)).to(p.device)}


def make_variants(batch: int, width: int, mode: str, skip: set[str], notes: list[str],
                  device: torch.device) -> tuple[dict[str, Variant], tuple]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    context = y if mode == "cdni" else None
    fused, eager = make_models(batch, width, mode, device)
    variants = {"fused": Variant("fused", fused, lambda: fused.train_step(x, y, F.cross_entropy, context)),
                "eager": Variant("eager", eager, lambda: eager.train_step(x, y, F.cross_entropy, context))}
    if "compiled" not in skip:
        torch._dynamo.reset()  # each row compiles new modules: without it the recompile limit drops later rows to eager
        # The true-target pass (sg_targets="true", the default) carries the gradient down with autograd.grad(...,
        # retain_graph=True), which a compiled backward with donated buffers refuses. With them off (the error's own
        # advice), Inductor (torch 2.14) still writes its backward's results into saved activations in place: the
        # second backward through a Linear -> BatchNorm -> ReLU block then got W's and gamma's gradients wrong by
        # 85-450 % (repro in docs/performance.md). inplace_buffers=False keeps them intact.
        torch._functorch.config.donated_buffer = False
        torch._inductor.config.inplace_buffers = False
        compiled = make_models(batch, width, mode, device)[1]
        try:
            for i, block in enumerate(compiled.blocks):
                compiled.blocks[i] = torch.compile(block, dynamic=False)
            for interface in compiled.interfaces:
                interface.synthetic_gradient = torch.compile(interface.synthetic_gradient, dynamic=False)
            variants["compiled"] = Variant("compiled", compiled, lambda: compiled.train_step(x, y, F.cross_entropy, context))
        except Exception as error:  # noqa: BLE001  e.g. no C++ compiler for Inductor
            notes.append(f"compiled: {type(error).__name__}: {error}")
    return variants, (x, y)


def _sg_params(model: torch.nn.Module) -> list[torch.Tensor]:
    if hasattr(model, "norms"):
        return list(model.synthetic_gradients.parameters())
    return [p for interface in model.interfaces for p in interface.parameters()]


def _all_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter (W, b, gamma, beta per hidden layer, the classifier's, the SGs'), one order for both kinds."""
    if hasattr(model, "norms"):
        hidden = [[*layer.parameters(), *norm.parameters()] for layer, norm in zip(model.layers, model.norms)]
        head = list(model.layers[-1].parameters())
    else:
        hidden = [list(block.parameters()) for block in model.blocks[:-1]]
        head = list(model.blocks[-1].parameters())
    return [p for group in hidden for p in group] + head + _sg_params(model)


def check_equal_step(variants: dict[str, Variant]) -> dict:
    starts = {name: [p.detach().clone() for p in _all_params(v.model)] for name, v in variants.items()}
    losses = {name: float(v.step().loss) for name, v in variants.items()}
    updates = {name: [p.detach() - p0 for p, p0 in zip(_all_params(v.model), starts[name])] for name, v in variants.items()}
    out = {}
    for name in variants:
        err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(updates[name], updates["fused"]))
        loss_err = abs(losses[name] - losses["fused"]) / abs(losses["fused"])
        out[name] = dict(update=err, loss=loss_err, ok=err <= CHECK_TOL and loss_err <= CHECK_TOL)
    return out


def run_row(batch: int, width: int, mode: str, opts: argparse.Namespace, device: torch.device) -> dict:
    row = dict(batch=batch, width=width, mode=mode, notes=[])
    variants, _ = make_variants(batch, width, mode, set(opts.skip), row["notes"], device)
    row["check"] = check_equal_step(variants)
    row["ms"] = common.step_times_ms({name: v.step for name, v in variants.items()}, device, opts.reps, 0.05, 20.0)
    row["memory"] = {name: common.peak_step_bytes(v.step, device) for name, v in variants.items()}
    return row


RATIOS = ("eager", "compiled")
HEADER = ["B", "width", "mode", *common.step_row_header(COLUMNS, RATIOS)]


def format_row(row: dict) -> list[str]:
    return [str(row["batch"]), str(row["width"]), row["mode"], *common.step_row_cells(row, COLUMNS, RATIOS, ".2f")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B 256, width 256, dni only (smoke test)")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--width", type=int, action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--skip", choices=("compiled",), action="append", default=[])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (default 7)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--markdown", metavar="PATH")
    common.add_whole_step_args(parser)
    opts = parser.parse_args(argv)
    device = common.bench_device(opts, "fcn_bn_step.py")
    if device is None:
        return 2
    notes = common.prepare_whole_step(device)
    title = f"fcn-bn training step on {common.device_name(device)}, torch {torch.__version__}"
    rows = []
    for note in notes:  # none on the CPU
        print(note)
    print(" | ".join(HEADER))
    for mode, width, batch in itertools.product(opts.mode or (QUICK["mode"] if opts.quick else MODES),
                                                opts.width or (QUICK["width"] if opts.quick else WIDTHS),
                                                opts.batch or (QUICK["batch"] if opts.quick else BATCHES)):
        rows.append(run_row(batch, width, mode, opts, device))
        print(" | ".join(format_row(rows[-1])), *rows[-1]["notes"], flush=True)
        common.write_step_tables(opts, title, HEADER, rows, format_row, notes)  # every row: a stopped run keeps them
    return 0 if all(all(c["ok"] for c in r["check"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
