"""cachefs: versioned ML datasets with a git-like CLI, read through a cached read-only FUSE mount.

The library and the `cachefs` command: `dataset/` (the object model and every operation on a
dataset's history), `remotes/` (the stores versions live in), `fs.py`, `fuse/` and `cache/` (the
mount), `cli/` (every command, including those that run the `storage_server`, `master` and `csi`
roles). docs/design.md describes the parts and their contracts; README.md how to use them.
"""

__version__ = "0.1.0"
