"""The CUDA backend as built: fastdni._C has CUDA kernels registered (where nvcc was there to build them), and its
fatbin holds, for every kernel of csrc/cuda, an sm_80 and an sm_90 cubin and compute_90 PTX, none spilling, and the
bf16/fp16 weight-gradient step runs on tensor cores (HMMA instructions in its machine code).

No GPU needed: cuobjdump (shipped with the triton wheel; fastdni/kernels/aot.py finds it) reads the built library. Spills
go to the thread's stack in local memory, so a cubin with a zero stack frame and zero local memory spills nothing
(ptxas's "0 bytes spill stores, 0 bytes spill loads"; its -v report of the build is in build/ext_build.log). The
table of registers and shared memory is printed (``pytest -s``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastdni.ops as ops
from fastdni.ops import _extension
from fastdni.ops.schema import CUDA_CPP_OPS

ARCHS = ("sm_80", "sm_90")
PTX_ARCH = "sm_90"  # TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": PTX for the newest target, for GPUs after it
DTYPES = ("float", "BFloat16", "Half")  # each kernel's instantiations, except those of KERNEL_DTYPES
# The weight-gradient step: fp32 on SIMT FMAs (IEEE products), bf16 / fp16 on tensor cores (WMMA).
KERNEL_DTYPES = {"grad_step_kernel": ("float",), "grad_step_tc_kernel": ("BFloat16", "Half")}
TENSOR_CORE_KERNELS = ("grad_step_tc_kernel",)
CUDA_SOURCES = sorted((Path(__file__).resolve().parents[2] / "csrc" / "cuda").glob("*.cu"))


def _nvcc_available() -> bool:
    """As setup.py decides whether to build csrc/cuda."""
    forced = os.environ.get("FASTDNI_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return torch.version.cuda is not None and (nvcc.exists() or shutil.which("nvcc") is not None)


def _kernel_names() -> set[str]:
    """The __global__ functions defined in csrc/cuda/*.cu."""
    names = set()
    for source in CUDA_SOURCES:
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source.read_text()))
    return names


requires_cuda_build = pytest.mark.skipif(not _nvcc_available(), reason="no nvcc (or torch without CUDA): csrc/cuda is not built")


@requires_cuda_build
def test_the_extension_registers_cuda_kernels():
    assert ops.HAS_CPU_KERNELS, f"fastdni._C did not load: {_extension.LOAD_ERROR}"
    assert ops.HAS_CUDA_KERNELS, "fastdni._C was built without csrc/cuda although nvcc is available"
    for name in CUDA_CPP_OPS:  # every op of csrc/cuda, sg_predict included
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdni::{name}", "CUDA"), name


@pytest.fixture(scope="module")
def cuobjdump():
    pytest.importorskip("triton")
    from fastdni.kernels import aot

    try:
        return aot.find_tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def library():
    if not ops.HAS_CUDA_KERNELS:
        pytest.skip("fastdni._C has no CUDA kernels")
    return _extension._C.__file__


def _run(tool: str, *args: str) -> str:
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """``{(arch, function): {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}`` from
    ``cuobjdump --dump-resource-usage``."""
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+?):?$", line):
            function = m.group(1)
        elif function is not None and "REG:" in line:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


@pytest.fixture(scope="module")
def usage(cuobjdump, library):
    table = parse_resource_usage(_run(cuobjdump, "--dump-resource-usage", library))
    print(f"\n{'arch':6} {'kernel':22} {'dtype':9} {'REG':>4} {'SHARED':>7} {'STACK':>6} {'LOCAL':>6}")
    for (arch, function), res in sorted(table.items(), key=lambda item: (item[0][0], _kernel_of(item[0][1]), _dtype_of(item[0][1]))):
        print(f"{arch:6} {_kernel_of(function):22} {_dtype_of(function):9} {res['REG']:4d} {res['SHARED']:7d} {res['STACK']:6d} "
              f"{res['LOCAL']:6d}")
    return table


def _kernel_of(function: str) -> str:
    return next((k for k in sorted(_kernel_names(), key=len, reverse=True) if k in function), function)


def _dtype_of(function: str) -> str:
    return "BFloat16" if "BFloat16" in function else "Half" if "Half" in function else "float"


def test_the_sources_define_kernels():
    assert {"grad_step_kernel", "error_loss_kernel", *TENSOR_CORE_KERNELS} <= _kernel_names(), _kernel_names()


def test_every_kernel_has_a_cubin_per_arch_and_dtype(usage):
    for arch in ARCHS:
        found = {(_kernel_of(f), _dtype_of(f)) for (a, f) in usage if a == arch}
        missing = {(k, d) for k in _kernel_names() for d in KERNEL_DTYPES.get(k, DTYPES)} - found
        assert not missing, f"{arch}: no cubin for {sorted(missing)}"


def test_every_kernel_has_ptx(cuobjdump, library, usage):
    listed = _run(cuobjdump, "--list-ptx", library)
    assert f".{PTX_ARCH}.ptx" in listed, listed
    entries = set(re.findall(r"\.entry\s+(\w+)", _run(cuobjdump, "--dump-ptx", library)))
    cubins = {f for (arch, f) in usage if arch == PTX_ARCH}
    assert cubins <= entries, f"kernels without PTX: {sorted(cubins - entries)}"


def test_no_kernel_spills(usage):
    spilling = {key: res for key, res in usage.items() if res["STACK"] or res["LOCAL"]}
    assert not spilling, f"kernels with a stack frame or local memory (spills): {spilling}"


def _sass_by_function(cuobjdump: str, library: str, arch: str) -> dict[str, str]:
    """``{function: its machine code}`` for one architecture, from ``cuobjdump -sass``."""
    functions, name = {}, None
    for line in _run(cuobjdump, "-arch", arch, "-sass", library).splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_and_fp16_steps_run_on_tensor_cores(cuobjdump, library, arch):
    sass = _sass_by_function(cuobjdump, library, arch)
    steps = {f: code for f, code in sass.items() if _kernel_of(f) in TENSOR_CORE_KERNELS}
    assert {_dtype_of(f) for f in steps} == {"BFloat16", "Half"}, sorted(steps)
    without = [f for f, code in steps.items() if "HMMA" not in code]
    assert not without, f"{arch}: no tensor-core instruction (HMMA) in {without}"
