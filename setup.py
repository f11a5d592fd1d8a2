"""Build script for the optional compiled kernels.

Pure-Python install works everywhere. When torch is importable at build time
(`pip install --no-build-isolation -e .`), two extensions are built from csrc/:

- ``segformer_fast._C_cpu``: CPU kernels (plain C++ with OpenMP, csrc/<op>/*_cpu.cpp) plus the one
  torch binding file csrc/bind_cpu.cpp.
- ``segformer_fast._C_cuda``: CUDA kernels (plain CUDA, csrc/<op>/*.cu) plus csrc/bind_cuda.cpp;
  built only when torch has CUDA and nvcc is found (or FORCE_CUDA=1).

SEGFORMER_FAST_NO_EXT=1 skips both. A failed optional build never fails the install: the package
falls back to its Triton and PyTorch paths and `segformer-fast info` says why.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def _extensions():
    if os.environ.get("SEGFORMER_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("segformer_fast: torch not importable at build time; building no extensions", file=sys.stderr)
        return [], {}

    exts = []
    cpu_kernels = _sources("*/*_cpu.cpp")
    if cpu_kernels and os.path.exists(os.path.join(ROOT, "csrc", "bind_cpu.cpp")):
        exts.append(
            cpp_extension.CppExtension(
                "segformer_fast._C_cpu",
                ["csrc/bind_cpu.cpp", *cpu_kernels],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2", "-std=c++17"],
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_kernels = _sources("*/*.cu")
    want_cuda = torch.version.cuda is not None or os.environ.get("FORCE_CUDA") == "1"
    if cuda_kernels and want_cuda and cpp_extension.CUDA_HOME is not None:
        exts.append(
            cpp_extension.CUDAExtension(
                "segformer_fast._C_cuda",
                ["csrc/bind_cuda.cpp", *cuda_kernels],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
            )
        )
    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
