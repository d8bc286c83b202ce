#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the linter and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k refs -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
