"""Every Triton kernel of fastdni/kernels/ (``fastdni.kernels``) compiles ahead of time for sm_80 and sm_90 with each of its
autotune configs, and no compiled variant spills registers.

CI has no GPU: elsewhere the kernels run only under the interpreter, which never compiles them. Here
``triton.compile`` builds cubins for a ``GPUTarget`` with no driver, and ptxas's report gives each variant's
registers, shared memory and spills (fastdni/kernels/aot.py: what a variant is, and which ones are compiled). The table is
printed (``pytest -s``) and the offending rows are in the failure messages. ``python -m fastdni.kernels.aot``
prints the same table; ``--all`` compiles every flag combination with every config.
"""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("triton")


def _tools_missing():
    """Why this module cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the kernels were defined with the interpreter's single config (run without it)"
    from fastdni.kernels import aot

    try:
        aot.find_tool("ptxas")
        aot.find_tool("cuobjdump")
    except aot.ToolMissing as e:
        return str(e)
    return None


_MISSING = _tools_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"cannot compile Triton kernels ahead of time: {_MISSING}")


@pytest.fixture(scope="module")
def aot():
    from fastdni.kernels import aot

    return aot


@pytest.fixture(scope="module")
def records(aot):
    """Compile the CI variant set once for the module, one process per core."""
    variants = aot.variant_set()
    start = time.perf_counter()
    result = aot.compile_all(variants)
    print(f"\n{aot.format_table(result)}\n{len(result)} variants compiled in {time.perf_counter() - start:.0f} s "
          f"on {os.cpu_count()} cores")
    return result


def test_every_config_of_every_kernel_is_in_the_set(aot):
    """For each dtype, each autotune config of each kernel that serves that dtype is compiled with each heaviest
    flag combination (on one arch, ragged sizes); every other call site is compiled too; and the full set
    (``--all``) holds every call site with every config of every dtype, on each arch with both sizes."""
    variants = aot.variant_set()
    full = {(v.kernel, v.label, v.config, v.dtype, v.arch, v.sizes) for v in aot.variant_set(full=True)}
    for kernel, sites in aot.CALL_SITES.items():
        configs = {dtype: aot.dtype_configs(kernel, dtype) for dtype in ("fp32", "bf16")}
        n_configs = len(aot.kernel_configs(kernel))
        assert n_configs > 1, f"{kernel}: one autotune config; the kernels were built for the interpreter?"
        assert set(configs["fp32"]) | set(configs["bf16"]) == set(range(n_configs)), (kernel, configs)
        heaviest = [label for label, _, _, heavy in sites if heavy]
        assert heaviest, f"{kernel}: no call site marked heaviest"
        for label, _, _, heavy in sites:
            got = [v for v in variants if (v.kernel, v.label) == (kernel, label)]
            if not heavy:
                assert len(got) == 1, (kernel, label, got)
                continue
            for dtype, want in configs.items():
                compiled = {v.config for v in got if v.dtype == dtype}
                assert compiled == set(want), (kernel, label, dtype, sorted(compiled), want)
            assert {(v.arch, v.sizes) for v in got} == {(aot.ARCHS[-1], "ragged")}, (kernel, label)
        for label, _, _, _ in sites:
            for dtype, want in configs.items():
                for arch in aot.ARCHS:
                    for sizes in aot.SIZES:
                        assert {(kernel, label, c, dtype, arch, sizes) for c in want} <= full, (kernel, label, dtype, arch, sizes)


def test_configs_pruned_by_operand_dtype(aot):
    """A launch tunes only over its dtype's configs (fp32 and bf16/fp16 lists), the ones the set compiles."""
    import torch

    cases = [("linear_act", "x_ptr", dict(M=4096, N=4096, K=4096)), ("gemm_grad_step", "g_ptr", dict(B=4096, N=4096, K=4096))]
    for kernel, arg, sizes in cases:
        tuner = aot._kernel(kernel)[0]
        configs = aot.kernel_configs(kernel)
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            kept = tuner.early_config_prune(tuner.configs, {arg: torch.empty(0, dtype=dtype), **sizes})
            assert [i for c in kept for i, x in enumerate(configs) if x is c] == aot.dtype_configs(kernel, name), (kernel, name)
        assert not set(aot.dtype_configs(kernel, "fp32")) & set(aot.dtype_configs(kernel, "bf16")), kernel


def test_ptxas_report_parsed_and_reproduced(aot):
    """The usage read from the log of Triton's own ptxas run is what a separate ``ptxas -v`` on the same PTX
    reports (the fallback where a Triton prints no log), and what the cubin holds."""
    import triton

    variant = next(v for v in aot.variant_set() if v.kernel == "bias_grad_step" and v.arch == 90)
    record = aot.compile_variant(variant)
    assert record.error is None, record.error
    assert "Function properties for _bias_grad_step_kernel" in record.ptxas_log, record.ptxas_log
    tuner, fn = aot._kernel(variant.kernel)
    signature, constexprs, attrs = aot._signature(fn, aot.KERNELS[variant.kernel], variant)
    config = tuner.configs[variant.config]
    kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs={**constexprs, **config.kwargs}, attrs=attrs),
                            target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    assert ".target sm_90a" in kernel.asm["ptx"]
    _, usage = aot._ptxas_usage(kernel.asm["ptx"], 90, fn.__name__)
    assert usage == (record.registers, record.stack, record.spill_stores, record.spill_loads)


def test_every_variant_compiles_within_the_gpus_limits(aot, records):
    failed = [r for r in records if r.error]
    assert not failed, "variants that did not compile (a changed kernel signature: update KERNELS in fastdni/kernels/aot.py):\n" + "\n".join(
        f"{r.kernel} [{r.label}] {r.config} {r.dtype} sm_{r.arch} {r.sizes}: {r.error}" for r in failed)
    for r in records:
        where = f"{r.kernel} [{r.label}] {r.config} {r.dtype} sm_{r.arch} {r.sizes}"
        assert r.cubin_bytes > 0, f"{where}: empty cubin"
        assert 0 < r.registers <= 255, f"{where}: {r.registers} registers"
        assert 0 <= r.shared <= aot.SHARED_LIMIT[r.arch], (
            f"{where}: {r.shared} bytes of shared memory, over sm_{r.arch}'s {aot.SHARED_LIMIT[r.arch]}")


def test_no_variant_spills_registers(aot, records):
    """0 bytes of spill stores and loads: a spilling config runs its inner loop through local memory (L1/L2)."""
    spilled = [r for r in records if not r.error and r.spills]
    assert not spilled, (f"{len(spilled)} of {len(records)} variants spill (prune their configs):\n"
                         + aot.format_table(spilled))
