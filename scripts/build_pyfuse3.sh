#!/usr/bin/env bash
# Builds a wheel of pyfuse3 with cachefs's patch (patches/pyfuse3-*.patch: reads without OPEN,
# see the patch's header) into the directory given as $1, using the Python given as $PYTHON
# (default python3). Needs what building pyfuse3 always needs: a C compiler, libfuse3-dev,
# pkg-config, and `patch`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest=$(realpath -m "${1:?usage: build_pyfuse3.sh WHEEL_DIR}")
PYTHON=${PYTHON:-python3}
patch_file=$(ls "$here"/patches/pyfuse3-*.patch)
version=$(basename "$patch_file" .patch)
version=${version#pyfuse3-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "pyfuse3==$version" -d "$work"
tar xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src="$work/pyfuse3-$version"
patch --quiet -p1 -d "$src" < "$patch_file"
rm -f "$src/src/pyfuse3/__init__.c"  # generated from the unpatched .pyx: Cython makes it again
mkdir -p "$dest"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dest" "$src"
