"""A quick check of an installed fastdni: ``python -m fastdni.smoke_test``.

Loads the compiled ops, runs one fused DNI layer step on every available backend and checks the
backends agree with the reference; exits non-zero on any failure."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastdni
from fastdni import ops
from fastdni.nn import DecoupledMLP


def main() -> int:
    backends = ["reference"] + (["cpu"] if ops.HAS_CPU_KERNELS else [])
    print(f"fastdni {fastdni.__version__} from {fastdni.__file__}; compiled CPU kernels: {ops.HAS_CPU_KERNELS}; "
          f"compiled CUDA kernels: {ops.HAS_CUDA_KERNELS}")
    params = []
    for backend in backends:
        torch.manual_seed(0)
        model = DecoupledMLP(32, (64, 64), 10, context_features=10, gradient_scale=16, backend=backend)
        x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
        for _ in range(3):
            result = model.train_step(x, y, F.cross_entropy, context=y)
        print(f"{backend:>9}: loss {float(result.loss):.4f}, SG losses {[round(float(s), 6) for s in result.sg_losses]}")
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for backend, p in zip(backends[1:], params[1:]):
        torch.testing.assert_close(p, params[0], rtol=1e-4, atol=1e-5, msg=lambda m, b=backend: f"{b} != reference: {m}")
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
