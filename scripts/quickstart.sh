#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded default remote (`local`):
# commits a sample ImageNet-like dataset, makes a second version, mounts the first version
# read-only, reads it through the cache, and shows it.
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
mkdir -p "$work/mnt"
if grep -qs " $PWD/$work/mnt fuse.cachefs " /proc/mounts; then cachefs umount "$work/mnt"; fi
trap 'cachefs umount "$work/mnt" >/dev/null 2>&1 || true' EXIT
step cachefs mount sample@v1 "$work/mnt" --cache-dir "$work/cache"
step ls -l "$work/mnt" "$work/mnt/train" | head -20
step head -3 "$work/mnt/labels.csv"
printf '\n\033[1m$ read every file of the mount, twice\033[0m\n'
python - "$work/mnt" <<'PY'
import os, sys, time
root = sys.argv[1]
paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
for epoch in (1, 2):
    start, total = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(f.read())
    took = time.perf_counter() - start
    print(f"epoch {epoch}: {len(paths)} files, {total / 2**20:.1f} MiB in {took:.2f} s "
          f"({total / 2**20 / took:.0f} MiB/s, {len(paths) / took:.0f} files/s)")
PY
step cachefs mounts
step cachefs stats "$work/mnt"
step cachefs umount "$work/mnt"
trap - EXIT
step cachefs checkout sample@v1 "$work/checkout"
step cachefs verify sample@v1
step cachefs datasets
echo
echo "quickstart: done. The repository is $(cachefs remote list --json | python -c 'import json,sys; print([r["url"] for r in json.load(sys.stdin) if r["name"]=="local"][0])')"
