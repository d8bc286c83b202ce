#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the linter and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k refs -x
# Tests run CACHEFS_TEST_WORKERS at a time (default 3, pytest-xdist; 0: one at a time, in this
# process): most of a test's time is spent waiting on the processes it starts (mounts,
# servers, peers), so three share two cores well (the suite: 6 minutes here, 15 one at a time).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n "${CACHEFS_TEST_WORKERS:-3}" --dist worksteal "$@"
