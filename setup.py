"""Build script for the compiled core ``nchains._C``.

CPU kernels are always built. CUDA kernels are built when ``NCHAINS_CUDA=1``, or when
``NCHAINS_CUDA`` is unset/empty and both ``nvcc`` and a CUDA-enabled torch are found.
``NCHAINS_CUDA=0`` forces a CPU-only build.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)


def _want_cuda() -> bool:
    flag = os.environ.get("NCHAINS_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"NCHAINS_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    if flag == "1":
        if torch.version.cuda is None:
            raise SystemExit("NCHAINS_CUDA=1 but the installed torch has no CUDA support")
        return True
    return has_nvcc and torch.version.cuda is not None


def _extension():
    # setuptools wants source paths relative to this file.
    csrc = "csrc"
    sources = [os.path.join(csrc, "nchains.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(csrc, "autograd", "*.cpp")))
    # -fno-trapping-math changes no result (nothing enables FP exceptions) but lets GCC
    # if-convert, hence vectorise, the ReLU selects of the fused backward epilogues (~3x).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    include_dirs = [os.path.join(ROOT, csrc)]
    if _want_cuda():
        # torch.utils.cpp_extension guesses /usr/local here; nvcc lives in /usr/local/cuda.
        if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
            import torch.utils.cpp_extension as ce

            ce.CUDA_HOME = "/usr/local/cuda"
        # Without a GPU the arch list cannot be detected; pick common data-centre targets.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        return CUDAExtension(
            "nchains._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("NCHAINS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("nchains._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
