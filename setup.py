"""The native kernel (merger/fold/_fold.c), built when a C compiler is there (optional: without one,
merger runs the torch kernel). Everything else about the package is in pyproject.toml."""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]
setup(ext_modules=[Extension("merger.fold._fold", ["merger/fold/_fold.c"], extra_compile_args=flags,
                             libraries=[] if sys.platform == "win32" else ["m"], optional=True)])
