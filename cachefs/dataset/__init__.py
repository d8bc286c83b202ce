"""Datasets and their versions in a remote: the object model and every operation on history.

`objects.py` (chunks, trees, commits and their encodings: docs/formats.md), `repo.py` (a
repository over a remote), `refs.py` (branches, tags, compare-and-swap, the reflog), `commit.py`,
`packing.py`, `scanindex.py`, `ignore.py` and `importer.py` (making versions from directories and
buckets), `checkout.py`, `diff.py`, `verify.py`, `fetch.py` (their parallel chunk reads),
`transfer.py` (push/pull), `gc.py` and `reach.py` (reclaiming space), `locks.py` (gc against
writers), `pins.py` (roots gc keeps).
"""
