"""Build hook for the compiled extension: cythonizes `cachefs/_lookup.pyx` at install time.

Everything else about the distribution (name, version, dependencies, packages) is in
pyproject.toml; setuptools merges the `ext_modules` given here into it. Cython is a build
requirement ([build-system] requires), so both `pip install .` and `pip install -e .` compile
the extension; the generated C file and the shared object are build outputs, never committed.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("cachefs._lookup", ["cachefs/_lookup.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
)
