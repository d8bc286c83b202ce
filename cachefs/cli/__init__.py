"""The `cachefs` command line: `main.py` parses and dispatches, one `*_cmd.py` per command group.

`common.py` holds what every command shares (opening the repository, `--json` output, progress
bars); errors map to exit codes through `cachefs.errors`.
"""
