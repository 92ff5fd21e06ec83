"""`pip wheel .` gives a wheel whose installed copy (compiled ops included) passes the smoke test.

The full check, a fresh venv with torch installed beside the wheel, is scripts/check_wheel.sh; here the
wheel is unpacked with `pip install --target` and imported ahead of the source tree, which is the
part that can break (missing package data, the extension not in the wheel, a wrong rpath).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdni.ops

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not fastdni.ops.HAS_CPU_KERNELS, reason="this install was built without the extension")
def test_wheel_installs_and_passes_the_smoke_test(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    (wheel,) = (tmp_path / "dist").glob("fastdni-*.whl")
    assert wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), wheel.name  # one wheel per torch version (setup.py)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-m", "fastdni.smoke_test"], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert [p.name for p in (tmp_path / "site" / "fastdni").glob("_C*.so")] == ["_C.abi3.so"]
    (metadata,) = (tmp_path / "site").glob("fastdni-*.dist-info/METADATA")
    torch_pin = "torch==%s.%s.*" % tuple(torch.__version__.split(".")[:2])  # the torch it was built against
    assert f"Requires-Dist: {torch_pin}\n" in metadata.read_text()
    assert f"from {tmp_path / 'site'}" in out and "compiled CPU kernels: True" in out and "smoke test passed" in out
    assert f"compiled CUDA kernels: {fastdni.ops.HAS_CUDA_KERNELS}" in out
    if fastdni.ops.HAS_CUDA_KERNELS:  # the wheel ships sm_80 and sm_90 cubins and PTX (for later GPUs)
        (library,) = (tmp_path / "site" / "fastdni").glob("_C*.so")
        elf, ptx = cuda_fatbin(str(library))
        assert {"sm_80", "sm_90"} <= elf and ptx, (elf, ptx)


@pytest.mark.skipif(not fastdni.ops.HAS_CPU_KERNELS, reason="this install was built without the extension")
def test_the_extension_is_built_for_the_limited_api():
    """The loaded library is the abi3 one: a stale ``_C.cpython-*.so`` beside it would be imported first."""
    from fastdni.ops import _extension

    assert Path(_extension._C.__file__).name == "_C.abi3.so", _extension._C.__file__


def cuda_fatbin(library: str) -> tuple[set[str], set[str]]:
    """The architectures of the cubins and of the PTX in ``library``'s fatbin (``cuobjdump --list-elf/--list-ptx``)."""
    from fastdni.kernels import aot

    cuobjdump = aot.find_tool("cuobjdump")
    listing = lambda flag: subprocess.run([cuobjdump, flag, library], check=True, capture_output=True, text=True).stdout  # noqa: E731
    return set(re.findall(r"\.(sm_\d+)\.cubin", listing("--list-elf"))), set(re.findall(r"\.(sm_\d+)\.ptx", listing("--list-ptx")))
