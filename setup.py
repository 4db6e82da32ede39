"""Builds fused_lstm._C: the CPU kernels always, the CUDA kernels when torch is a CUDA
build and a CUDA toolkit is found (CUDA_HOME). FUSED_LSTM_CUDA=0|1 forces either way.

The decision never asks torch.cuda.is_available(): a machine without a GPU (CI) still
builds and links the CUDA kernels when torch and the toolkit allow it.
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    forced = os.environ.get("FUSED_LSTM_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        raise RuntimeError(f"FUSED_LSTM_CUDA must be 0 or 1, got {forced!r}")
    has_cuda_sources = bool(_sources("csrc/cuda/*.cu"))
    if forced == "0":
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1":
        if not available:
            raise RuntimeError(
                "FUSED_LSTM_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was "
                f"found (torch.version.cuda={torch.version.cuda}, "
                f"CUDA_HOME={cpp_extension.CUDA_HOME}); set CUDA_HOME to the toolkit's root"
            )
        if not has_cuda_sources:
            raise RuntimeError("FUSED_LSTM_CUDA=1 but there are no CUDA sources in csrc/cuda")
        return True
    return available and has_cuda_sources


# Sources compiled a second time with these flags, their kernels picked at run time
# only on CPUs that have the instructions (csrc/cpu/kernels.h).
ISA_SOURCES = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma"],
    "csrc/cpu/kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                    "-mfma"],
}


class BuildWithIsaFlags(BuildExtension):
    """BuildExtension, plus per-file instruction-set flags for ISA_SOURCES (setuptools
    gives every source of an extension the same flags)."""

    def build_extension(self, ext):
        isa = [src for src in ext.sources if src in ISA_SOURCES]
        ext.sources = [src for src in ext.sources if src not in isa]
        for src in isa:
            cflags = dict(ext.extra_compile_args)
            cflags["cxx"] = cflags["cxx"] + ISA_SOURCES[src]
            ext.extra_objects = list(ext.extra_objects or []) + self.compiler.compile(
                [src], output_dir=self.build_temp, macros=ext.define_macros,
                include_dirs=ext.include_dirs, extra_postargs=cflags,
            )
        super().build_extension(ext)


def _extension():
    use_cuda = _want_cuda()
    # The emulation of the CUDA kernels on the host is test code, built by the tests
    # themselves (tests/emulator), never into the user's _C.
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    macros = [("TORCH_EXTENSION_NAME", "_C")]
    if platform.machine().lower() in ("x86_64", "amd64") and platform.system() != "Windows":
        macros.append(("FUSED_LSTM_HAVE_AVX2", "1"))
    else:
        sources = [src for src in sources if src not in ISA_SOURCES]
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 since
    # torch 2.14, whose headers no longer compile as C++17).
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    if platform.system() != "Windows":
        # at::parallel_for runs in parallel only in code compiled with OpenMP; the
        # runtime is the one torch already loaded (same soname, libgomp.so.1).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not use_cuda:
        return CppExtension(
            "fused_lstm._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # A call from __host__ __device__ code to a __host__ function is nvcc's warning, and
    # compiles into a trap that drops the kernel's work: an error instead (the constexpr
    # kind, legal here under torch's --expt-relaxed-constexpr, is one in every other build:
    # FUSED_LSTM_DEVICE_CODE_BEGIN in csrc/cuda/lstm_kernels.cuh).
    nvcc = ["-O3", "-lineinfo", "-Werror", "cross-execution-space-call"]
    return CUDAExtension(
        "fused_lstm._C", sources + _sources("csrc/cuda/*.cu"),
        define_macros=macros + [("FUSED_LSTM_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithIsaFlags},
)
