"""Build of fastdni: the Python package plus, once their sources exist, the C++/CUDA ops.

Extension layout (filled in by the fused-ops issues; nothing to change here when they land):
  csrc/cpu/*.cpp   always compiled into ``fastdni._C`` (needs torch at build time)
  csrc/cuda/*.cu   added when torch.version.cuda is set and nvcc is found
The sources register ops with TORCH_LIBRARY; since fastdni._C is a Python extension module, one of them
must also define PyInit__C (as pytorch/extension-cpp does) so that `import fastdni._C` loads it.
Checked with a probe op (not committed): CPU + CUDA build, sm_80 and sm_90 cubins, cuBLASLt linked.

Switches (environment):
  FASTDNI_BUILD_EXT=0     build the pure-Python package only
  FASTDNI_BUILD_CUDA=0/1  force the CUDA sources off / on
  CUDA_HOME               defaults to /usr/local/cuda
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0+PTX" (there is no GPU to detect at build time)
"""
import glob
import os
import shutil
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cuda_sources = _sources("csrc/cuda/*.cu") if _cuda_wanted() else []
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
                                         extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastdni",
    version="0.1.0",
    description="Decoupled Neural Interfaces using Synthetic Gradients for PyTorch: reference, modules, fused kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton backend lives in the top-level kernels/ folder and installs as fastdni.kernels.
    packages=find_packages(include=["fastdni", "fastdni.*"]) + ["fastdni.kernels"],
    package_dir={"fastdni.kernels": "kernels"},
    install_requires=["torch>=2.14", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["fastdni-mnist=fastdni.experiments.mnist:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
