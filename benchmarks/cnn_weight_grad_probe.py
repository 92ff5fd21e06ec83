"""Why the CNN's fused weight step (the ops' GEMM over the unfolded input) loses to ATen's on the CPU: each piece timed.

    python benchmarks/cnn_weight_grad_probe.py --threads 1 [--batch 256]

Per conv of ``--model cnn`` (the second block, and the cdni SGs), for one step's weight gradient: the unfold into a kept
workspace (``fastdni.nn.fused_cnn.unfold_rows``), the GEMM ``delta^T unfold(x)`` alone (``torch.mm``, MKL), the whole
``dni_update_`` (that GEMM with Adam in the epilogue, and the bias), against ATen's ``convolution_backward`` for the
weight and bias gradients (oneDNN's direct kernel) and a fused Adam step on them; GFLOP/s of the two GEMM-shaped
pieces (``2 * B*H*W * C_out * k*k*C_in`` flops). Medians of 7 runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastdni import ops
from fastdni.nn.fused_cnn import Workspace, unfold_rows, weight_rows

CONVS = {"block 2 (32->64, 14x14)": (32, 64, 14), "cdni SG 1 (32->32, 14x14)": (32, 32, 14),
         "cdni SG 2 (64->64, 7x7)": (64, 64, 7)}


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    k, batch = 5, opts.batch
    print("conv | unfold ms | mm ms (GF/s) | dni_update_ ms | aten dW+db ms (GF/s) | + Adam ms | gemm path / aten path")
    for name, (c_in, c_out, size) in CONVS.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c_in, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        delta = torch.randn(batch, c_out, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        weight = (0.05 * torch.randn(c_out, c_in, k, k, generator=gen)).contiguous(memory_format=torch.channels_last)
        bias = torch.zeros(c_out)
        state = [torch.zeros_like(weight), torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(bias)]
        hyper = [1e-9, 0.9, 0.999, 1e-8, 0.0, 0.0, 1.0]  # a tiny lr: the weight barely moves between repetitions
        workspace = Workspace()
        rows = delta.permute(0, 2, 3, 1).reshape(-1, c_out)
        flops = 2 * rows.shape[0] * c_out * k * k * c_in
        columns = unfold_rows(x, k, workspace)
        unfold = median_ms(lambda: unfold_rows(x, k, workspace))
        mm = median_ms(lambda: torch.mm(rows.t(), columns))
        step_state = [weight_rows(s) if s.dim() == 4 else s for s in state]
        forward = ops.ForwardResult(rows, rows.new_empty(0), rows, [])
        update = median_ms(lambda: ops.dni_update_(columns, weight_rows(weight), bias, forward, "adam", hyper, step_state,
                                                   activation="identity"))
        aten = median_ms(lambda: torch.ops.aten.convolution_backward(
            delta, x, weight, [c_out], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, [False, True, True]))
        _, dw, db = torch.ops.aten.convolution_backward(delta, x, weight, [c_out], [1, 1], [2, 2], [1, 1], False, [0, 0],
                                                        1, [False, True, True])
        steps = [torch.tensor(1.0), torch.tensor(1.0)]
        adam = median_ms(lambda: torch._fused_adam_([weight, bias], [dw, db], state[0::2], state[1::2], [], steps,
                                                    lr=1e-9, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                                                    amsgrad=False, maximize=False))
        print(f"{name} | {unfold:.2f} | {mm:.2f} ({flops / mm / 1e6:.0f}) | {update:.2f} | "
              f"{aten:.2f} ({flops / aten / 1e6:.0f}) | {adam:.2f} | {(unfold + update) / (aten + adam):.2f}x")


if __name__ == "__main__":
    main()
