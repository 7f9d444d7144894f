"""Build fastfpm's compiled parts: the Cython worker loop with the C codec, and the cffi scoreboard reader.

There is deliberately no pure-Python fallback for the worker loop: if the compiler or Cython is
missing the build fails here, loudly, instead of installing something that cannot serve.
"""

import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "fastfpm._core",
    sources=["fastfpm/_core.pyx", "csrc/fcgi.c"],
    include_dirs=["csrc"],
    depends=["csrc/fcgi.h", "csrc/scoreboard.h", "fastfpm/_core.pxd", *glob.glob("fastfpm/_*.pxi")],
    extra_compile_args=["-O2", "-fno-strict-aliasing"],
)

setup(
    ext_modules=cythonize([core], compiler_directives={"language_level": "3"}),
    cffi_modules=["fastfpm/_scoreboard_build.py:ffibuilder"],
)
