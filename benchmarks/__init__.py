"""Reproducible benchmarks; each prints ratios against a baseline measured in the same run.

One module per benchmark (`python -m benchmarks.NAME`, `--quick` for a smoke run, `--json` for one
JSON object); `common.py` holds what they share. Results, methods and how to run them again:
docs/benchmarks.md.
"""
