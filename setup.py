"""Build of fastdni: the Python package plus the C++/CUDA ops.

Extension layout:
  csrc/cpu/*.cpp   always compiled into ``fastdni._C`` (needs torch at build time)
  csrc/cuda/*.cu, *.cpp  added when torch.version.cuda is set and nvcc is found
The sources register ops with TORCH_LIBRARY; since fastdni._C is a Python extension module, one of them
must also define PyInit__C (as pytorch/extension-cpp does) so that `import fastdni._C` loads it.

Switches (environment):
  FASTDNI_BUILD_EXT=0     build the pure-Python package only
  FASTDNI_BUILD_CUDA=0/1  force the CUDA sources off / on
  CUDA_HOME               defaults to /usr/local/cuda
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0+PTX" (there is no GPU to detect at build time)

One wheel per torch version serves every CPython >= 3.10: fastdni._C is built against the limited C API
(``py_limited_api``, as pytorch/extension-cpp builds it). It can be: it has no pybind and no libtorch_python, its
only Python C-API calls are PyInit__C's (the ops reach Python through the dispatcher), and torch defines
Py_LIMITED_API for every compiler (C++ and nvcc) of such an extension. The library is ``_C.abi3.so``, the wheel
``*-cp310-abi3-<platform>.whl``, and it requires the torch minor release it was built against: one wheel per torch
version.

The compilers' output, with nvcc's -Xptxas=-v report of every kernel (registers, spills, shared memory), is kept
in build/ext_build.log (appended to by each build).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_PYTHON = (3, 10)  # python_requires, the abi3 wheel's tag and Py_LIMITED_API: the same version


def _limited_api_tag(ext_modules):
    """The wheel's ``cpXY`` tag for the limited API, or None where the extension can't use it (no extension).

    torch compiles a ``py_limited_api`` extension with ``-DPy_LIMITED_API=cpp_extension.min_supported_cpython``;
    the tag must name that same version, or the wheel would claim Pythons the library was not built for."""
    if not ext_modules:
        return None
    from torch.utils import cpp_extension

    hexversion = int(cpp_extension.min_supported_cpython, 16)
    torch_min = (hexversion >> 24, (hexversion >> 16) & 0xFF)
    if torch_min != MIN_PYTHON:
        raise RuntimeError(f"torch builds limited-API extensions for Python {torch_min}, setup.py's MIN_PYTHON is "
                           f"{MIN_PYTHON}: change MIN_PYTHON (python_requires and the wheel's tag follow it)")
    return "cp%d%d" % MIN_PYTHON


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_wanted():
    forced = os.environ.get("FASTDNI_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return torch.version.cuda is not None and (os.path.exists(nvcc) or shutil.which("nvcc") is not None)


def extensions():
    """The ``fastdni._C`` extension and its build command, or nothing if there are no C++ sources."""
    cpu_sources = _sources("csrc/cpu/*.cpp")
    if os.environ.get("FASTDNI_BUILD_EXT", "1") == "0" or not cpu_sources:
        return [], {}
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(ROOT, "csrc")]
    # -std is torch's to choose (2.14 needs C++20). No -ffast-math: the ops must match torch.optim to rounding;
    # -fno-math-errno only lets sqrt vectorise (nothing reads errno). -fopenmp: at::parallel_for is a header
    # template, compiled into this library; without OpenMP it silently runs every loop on one thread.
    extra = {"cxx": ["-O3", "-fno-math-errno", "-fopenmp"]}
    link = ["-fopenmp"]
    # csrc/cuda: kernels in .cu (compiled per architecture, so they include no ATen), host code in .cpp.
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp") if _cuda_wanted() else []
    if cuda_sources:
        nvidia = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
        include_dirs.append(os.path.join(nvidia, "include"))
        extra["nvcc"] = ["-O3", "-Xptxas=-v", "-DFASTDNI_WITH_CUDA"]
        extra["cxx"].append("-DFASTDNI_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            "fastdni._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            py_limited_api=True,
            library_dirs=[os.path.join(nvidia, "lib")],
            # No unversioned libcublasLt.so ships in the wheel. rpath: the nvidia wheel beside an installed
            # fastdni ($ORIGIN/..), then the one this build used (editable installs).
            extra_link_args=link + [
                "-l:libcublasLt.so.13",
                "-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib",
                "-Wl,-rpath," + os.path.join(nvidia, "lib"),
            ],
        )
    else:
        ext = cpp_extension.CppExtension("fastdni._C", cpu_sources, include_dirs=include_dirs, extra_compile_args=extra,
                                         extra_link_args=link, py_limited_api=True)
    return [ext], {"build_ext": _tree_build(cpp_extension.BuildExtension).with_options(use_ninja=True)}


BUILD_LOG = os.path.join(ROOT, "build", "ext_build.log")


def _check_shared_libstdcxx(library):
    """Fail the build when ``library`` carries its own copy of libstdc++ instead of loading the shared one.

    torch's libraries use the system's libstdc++.so; a static copy (some toolchains link it so, e.g. a GCC built
    under /opt with only libstdc++.a) has its own std::locale, never initialised: the first number an error message
    formats (``TORCH_CHECK(..., size)``) segfaults. Seen on a lent GPU machine whose CXX was /opt/gcc/bin/g++.
    Checked with readelf (binutils, beside every linker); skipped where it is missing."""
    readelf = shutil.which("readelf")
    if readelf is None or not os.path.exists(library):
        return
    dynamic = subprocess.run([readelf, "-d", library], capture_output=True, text=True).stdout
    if "libstdc++" not in dynamic:
        os.remove(library)
        compiler = os.environ.get("CXX", "c++")
        raise RuntimeError(
            f"{library} links libstdc++ statically (no libstdc++.so among its NEEDED libraries; CXX={compiler}), so "
            "its error messages would crash inside torch's process. Build with the compiler torch's libraries use, "
            "e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc.")


def _tree_build(base):
    """``base`` with two changes.

    - One object directory for every build of this tree (editable install, ``build_ext --inplace``, ``pip wheel``):
      ninja then recompiles only what changed, so the wheel built after ``scripts/setup.sh``'s install (by
      tests/packaging/test_wheel.py in CI) compiles nothing; the CUDA sources take minutes on 2 cores.
    - An in-place build (editable install) deletes the tree's other ``_C.*.so``: Python would import a stale
      ``_C.cpython-311-*.so`` (from before the abi3 build) ahead of the new ``_C.abi3.so``, its suffix comes first.
    - The compilers' output kept in build/ext_build.log as well as printed: nvcc's ``-Xptxas=-v`` lines (registers,
      spill stores/loads, shared memory of every kernel, per architecture) would otherwise scroll past, or vanish
      under ``pip -q``. The compilers write to file descriptors 1 and 2 (ninja's children), so those are
      redirected, not sys.stdout."""

    class TreeBuild(base):
        def finalize_options(self):
            super().finalize_options()
            # build/temp.<platform>-<python> (setuptools' own name for it), whatever build base the caller chose (an
            # editable install picks a temporary one)
            self.build_temp = os.path.join(ROOT, "build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}")

        def build_extensions(self):
            os.makedirs(os.path.dirname(BUILD_LOG), exist_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # Appended: a rebuild compiles only what changed, and the earlier reports stay valid for the rest.
            with open(BUILD_LOG, "a") as log:
                log.write(f"== build_ext {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                start = log.tell()
            saved = os.dup(1), os.dup(2)
            try:
                with open(BUILD_LOG, "a") as log:
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    super().build_extensions()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                with open(BUILD_LOG) as log:
                    log.seek(start)
                    sys.stdout.write(log.read())
                print(f"compiler output (ptxas -v included): {BUILD_LOG}")
            for ext in self.extensions:
                _check_shared_libstdcxx(self.get_ext_fullpath(ext.name))

        def copy_extensions_to_source(self):
            # setuptools' step of an in-place build (editable installs too): the library is built in build/, then
            # copied into the source tree, beside whatever an earlier build left there.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                fullname = self.get_ext_fullname(ext.name)
                package, _, name = fullname.rpartition(".")
                directory = build_py.get_package_dir(package)
                built = os.path.join(directory, os.path.basename(self.get_ext_filename(fullname)))
                for stale in glob.glob(os.path.join(directory, name + ".*.so")):
                    if os.path.abspath(stale) != os.path.abspath(built):
                        os.remove(stale)
                        print(f"removed {stale}: {os.path.basename(built)} replaces it")

    return TreeBuild


def _torch_requirement(ext_modules):
    """The torch the package needs: with the extension, the minor release it was built against (torch's C++ API,
    which the extension uses, has no stable ABI across releases, and a library that fails to load would leave only
    the reference backend); without it, any from 2.14 on."""
    if not ext_modules:
        return "torch>=2.14"
    import torch

    return "torch==%s.%s.*" % tuple(torch.__version__.split(".")[:2])


ext_modules, cmdclass = extensions()
abi3_tag = _limited_api_tag(ext_modules)

setup(
    name="fastdni",
    version="0.1.0",
    description="Decoupled Neural Interfaces using Synthetic Gradients for PyTorch: reference, modules, fused kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=%d.%d" % MIN_PYTHON,
    packages=find_packages(include=["fastdni", "fastdni.*"]),
    install_requires=[_torch_requirement(ext_modules), "numpy", "tqdm", "matplotlib"],
    # nvidia-cutlass: headers only, for scripts/cutlass_probe.sh (tests/packaging/test_cutlass_probe.py); pinned, the probe's
    # findings in docs/performance.md are for this version.
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "nvidia-cutlass==4.2.0.0"]},
    entry_points={"console_scripts": ["fastdni-mnist=fastdni.experiments.mnist:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": abi3_tag}} if abi3_tag else {},
)
