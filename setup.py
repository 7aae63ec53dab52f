"""Build the optional native CPU kernel `salr._bitmap_cpu` (project metadata lives in pyproject.toml).

A plain C shared library over raw buffers, loaded with ctypes (salr/ops/cpu.py): it needs no torch or Python
headers, so it builds in pip's isolated environment. The AVX2/FMA/F16C code carries target attributes and is
picked at run time, so the library runs on any x86-64 CPU. If compiling fails the install goes on without it and
salr uses the reference backend. `salr._fastcall`, also optional, binds the two fused decode calls for CPython
(Python.h): ctypes' argument conversion costs about as much as a small layer's arithmetic. Build in place for
development: `python setup.py build_ext --inplace`.
"""

import sys

from setuptools import Extension, setup

compile_args = ["-O3", "-std=c11", "-Wall"]
link_args = []
if sys.platform.startswith("linux"):  # gcc/clang with libgomp; macOS clang has no -fopenmp by default
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

setup(
    ext_modules=[
        Extension(
            "salr._bitmap_cpu",
            sources=["csrc/bitmap_cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
        # CPython bindings of the fused decode calls (~2 us less per call than ctypes); needs Python.h.
        Extension("salr._fastcall", sources=["csrc/fastcall.c"], extra_compile_args=["-O2", "-Wall"], optional=True),
    ]
)
