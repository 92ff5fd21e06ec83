#!/usr/bin/env bash
# Builds the fastdni wheel (C++ extension included) and installs it into a fresh venv beside torch
# 2.14.1, then runs a smoke test from outside the source tree. Usage: bash scripts/check_wheel.sh [WORKDIR]
# Needs .venv from scripts/setup.sh (the wheel builds against its torch: --no-build-isolation).
# PYTHON picks the fresh venv's interpreter (default python3): the wheel is abi3, so any CPython at or above
# its cpXY tag must load it, not only the one that built it.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
.venv/bin/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/fastdni-*.whl)
echo "built $wheel"
# One wheel per torch version, for every CPython from the minimum on (setup.py: py_limited_api): the tag is
# abi3 and names the same minimum as Requires-Python, the library inside is _C.abi3.so, and the wheel requires
# the torch minor release it was built against.
.venv/bin/python - "$wheel" <<'EOF'
import re, sys, zipfile
import torch
wheel = sys.argv[1]
tag = re.search(r"-(cp3(\d+))-abi3-linux_x86_64\.whl$", wheel)
assert tag, f"{wheel}: not an abi3 wheel (expected a name ending in -cp3X-abi3-linux_x86_64.whl)"
with zipfile.ZipFile(wheel) as z:
    libraries = [n for n in z.namelist() if re.fullmatch(r"fastdni/_C\..*so", n)]
    (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = z.read(metadata).decode()
    requires = re.search(r"^Requires-Python: >=3\.(\d+)$", metadata, re.M)
torch_pin = "torch==%s.%s.*" % tuple(torch.__version__.split(".")[:2])
assert f"Requires-Dist: {torch_pin}\n" in metadata, f"{wheel}: does not require {torch_pin}, the torch it was built against"
assert libraries == ["fastdni/_C.abi3.so"], f"{wheel}: the extension must be fastdni/_C.abi3.so, found {libraries}"
assert requires and requires[1] == tag[2], f"{wheel}: tag {tag[1]} but Requires-Python >=3.{requires and requires[1]}"
print(f"abi3 wheel: {tag[1]}-abi3, fastdni/_C.abi3.so, Requires-Python >=3.{requires[1]}, {torch_pin}")
EOF
# The limited API holds at link level too: no libtorch_python or libpython, and no private (_Py*) CPython symbol.
unzip -q -o -d "$work/unpacked" "$wheel" fastdni/_C.abi3.so
library="$work/unpacked/fastdni/_C.abi3.so"
if readelf -d "$library" | grep -E 'NEEDED.*(libtorch_python|libpython)'; then
  echo "$library links the full Python API (above)" >&2
  exit 1
fi
if nm -D --undefined-only "$library" | grep -E ' _Py'; then
  echo "$library uses private CPython symbols (above)" >&2
  exit 1
fi
echo "CPython symbols used: $(nm -D --undefined-only "$library" | awk '$2 ~ /^Py/ {print $2}' | tr '\n' ' ')"
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -V
"$work/venv/bin/pip" install -q --disable-pip-version-check torch==2.14.1 "$wheel"
cd "$work"  # away from the source tree, so `import fastdni` can only find the installed wheel
"$work/venv/bin/python" -m fastdni.smoke_test
