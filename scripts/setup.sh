#!/usr/bin/env bash
# Installs what cachefs needs on a fresh Debian machine: system packages (only when missing)
# and a virtual environment in .venv with the project and its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# bindfs: the C FUSE passthrough that benchmarks.fuse_floor measures (its --quick run is a test);
# rclone, s3fs, curl: the gateway's tests read through it with the clients users have;
# nginx-light, wrk: benchmarks.gateway's baseline and load generator (its --quick run is a test)
DEBIAN_PACKAGES=(fuse3 libfuse3-dev pkg-config patch bindfs rclone s3fs curl nginx-light wrk)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: cachefs needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.cachefs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] ||
   [ cachefs/_lookup.pyx -nt "$stamp" ] || [ storage_server/_needle.pyx -nt "$stamp" ]; then
  echo "setup: installing cachefs and its test dependencies into .venv" >&2
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e '.[test]'; } >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -30 >&2
    echo "setup: pip install failed (full log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

# pyfuse3 with cachefs's patch (patches/pyfuse3-*.patch: reads without OPEN, one FUSE request per
# small file instead of three, and the hook of the SSD tier's compiled read path; READ_HOOK is
# the newest part's flag). cachefs works without it, only slower: a failed build warns.
if ! .venv/bin/python -c 'import pyfuse3, sys; sys.exit(not getattr(pyfuse3, "READ_HOOK", 0))' \
     2>/dev/null; then
  echo "setup: building pyfuse3 with cachefs's patch" >&2
  log=.venv/pyfuse3-build.log
  rm -f .venv/wheels/pyfuse3-*.whl
  if PYTHON=.venv/bin/python scripts/build_pyfuse3.sh .venv/wheels >"$log" 2>&1 &&
     .venv/bin/python -m pip install --no-deps --force-reinstall .venv/wheels/pyfuse3-*.whl \
       >>"$log" 2>&1; then
    :
  else
    grep -v '^WARNING: Location' "$log" | tail -20 >&2
    echo "setup: WARNING: pyfuse3 stays unpatched (log: $log); mounts work, small files slower" >&2
  fi
fi

# The aws CLI (pip awscli) for the gateway's tests, in its own environment: it pins a botocore
# of its own, which must not replace the one boto3 uses in .venv.
if [ ! -x .venv/awscli/bin/aws ]; then
  echo "setup: installing the aws CLI into .venv/awscli" >&2
  log=.venv/awscli-install.log
  if ! { "$PYTHON" -m venv .venv/awscli &&
         .venv/awscli/bin/python -m pip install awscli; } >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -20 >&2
    echo "setup: installing the aws CLI failed (full log: $log)" >&2
    exit 1
  fi
fi
