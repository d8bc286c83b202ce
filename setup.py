"""Build hook for the compiled extensions: cythonizes `cachefs/_lookup.pyx` (the read path's
extent lookup), `cachefs/cache/_fastread.pyx` (the SSD tier's compiled read path for FUSE) and
`storage_server/_needle.pyx` (the storage server's needle read) at install time.

Everything else about the distribution (name, version, dependencies, packages) is in
pyproject.toml; setuptools merges the `ext_modules` given here into it. Cython is a build
requirement ([build-system] requires), so both `pip install .` and `pip install -e .` compile
the extensions; the generated C files and the shared objects are build outputs, never committed.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("cachefs._lookup", ["cachefs/_lookup.pyx"]),
         # Optional: without it (no pthreads or dlopen here), mounts read every file in Python.
         Extension("cachefs.cache._fastread", ["cachefs/cache/_fastread.pyx"], optional=True),
         Extension("storage_server._needle", ["storage_server/_needle.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
)
