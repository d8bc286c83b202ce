#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded default remote (`local`):
# commits a sample ImageNet-like dataset, makes a second version, and shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
work=.quickstart
rm -rf "$work/checkout"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

if [ ! -d "$work/sample" ]; then
  python -m cachefs.sample "$work/sample" --small-files 400 --large-files 1 --large-size 24MiB
fi
if ! cachefs datasets --json | python -c 'import json,sys; sys.exit(not any(d["name"]=="sample" for d in json.load(sys.stdin)))'; then
  step cachefs init sample
fi
step cachefs commit sample "$work/sample" -m "sample dataset: 400 images and a shard"
cachefs tag sample -d v1 >/dev/null 2>&1 || true  # re-runs move the demo tag
step cachefs tag sample v1
# A second version: relabel, add and remove a few images.
python - "$work/sample" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random()
d = os.path.join(root, "train", "class_0000")
for name in sorted(os.listdir(d))[:3]:
    os.remove(os.path.join(d, name))
with open(os.path.join(d, f"img_new_{rng.randrange(10**9):09d}.jpg"), "wb") as f:
    f.write(rng.randbytes(100_000))
with open(os.path.join(root, "labels.csv"), "a") as f:
    f.write("# relabelled\n")
PY
step cachefs commit sample "$work/sample" -m "v2: drop 3 images, add 1, relabel"
step cachefs log sample -n 2
step cachefs diff sample@v1 main
step cachefs ls sample:train -l
step cachefs checkout sample@v1 "$work/checkout"
step cachefs verify sample@v1
step cachefs datasets
echo
echo "quickstart: done. The repository is $(cachefs remote list --json | python -c 'import json,sys; print([r["url"] for r in json.load(sys.stdin) if r["name"]=="local"][0])')"
