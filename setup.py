"""Build of the adaloss C extension.

OpenBLAS comes from the scipy-openblas32 wheel (the build NumPy uses; its
symbols carry a "scipy_" prefix) unless ADALOSS_BLAS=system, which links a
system OpenBLAS found with pkg-config (`apt-get install libopenblas-dev`).
"""
import os
import shlex
import subprocess
import sys
from glob import glob

import numpy
from setuptools import Extension, setup

CORE_SOURCES = sorted(glob("csrc/*.c"))
COMPILE_ARGS = ["-O3", "-std=c11", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
LINK_ARGS = ["-fopenmp"]


def blas_flags():
    """(include_dirs, library_dirs, libraries, macros, link_args) for OpenBLAS."""
    if os.environ.get("ADALOSS_BLAS", "scipy-openblas") == "system":
        try:
            cflags = subprocess.check_output(["pkg-config", "--cflags", "openblas"], text=True)
            libs = subprocess.check_output(["pkg-config", "--libs", "openblas"], text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            sys.exit(f"ADALOSS_BLAS=system: pkg-config cannot find openblas ({exc}); "
                     "install libopenblas-dev or unset ADALOSS_BLAS")
        incs = [f[2:] for f in shlex.split(cflags) if f.startswith("-I")]
        return incs, [], [], [], shlex.split(libs)
    import scipy_openblas32

    lib_dir = scipy_openblas32.get_lib_dir()
    # At run time the library is found next to us in site-packages
    # ($ORIGIN/../scipy_openblas32/lib); adaloss/__init__ also preloads it.
    rpath = "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"
    return ([scipy_openblas32.get_include_dir()], [lib_dir], [scipy_openblas32.get_library()],
            [("ADA_BLAS_PREFIX_SCIPY", "1")], [rpath])


incs, lib_dirs, libs, macros, blas_link = blas_flags()

setup(
    ext_modules=[
        Extension(
            "adaloss._core",
            sources=CORE_SOURCES,
            include_dirs=["csrc", numpy.get_include(), *incs],
            library_dirs=lib_dirs,
            libraries=libs,
            define_macros=macros,
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS + blas_link,
        )
    ],
)
