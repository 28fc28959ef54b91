"""Builds the XNOR-popcount kernels of the packed inference path (bnn_adapt/deploy/csrc).

A plain C library (no Python or torch headers, so pip's isolated build needs
nothing but setuptools and the system C compiler), loaded with ctypes. It is
optional: without a compiler the package installs anyway and predicts on the
float path, with one warning line. OpenMP is used when the compiler has it.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"]


class BuildKernels(build_ext):
    """Compile with OpenMP where the compiler supports it, else without (single-threaded kernels)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            if OPENMP[0] not in ext.extra_compile_args:
                raise
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            self.warn("compiling the bnn_adapt kernels with OpenMP failed; retrying without (single-threaded kernels)")
            super().build_extension(ext)


kernels = Extension(
    "bnn_adapt.deploy._bitconv",
    sources=[f"bnn_adapt/deploy/csrc/{name}.c" for name in ("bitconv", "bitconv_avx2", "bitconv_avx512")],
    depends=["bnn_adapt/deploy/csrc/bitconv.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-strict-aliasing", *OPENMP],
    extra_link_args=[*OPENMP, "-lm"],
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildKernels})
