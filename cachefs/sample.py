"""Synthetic ImageNet-like datasets for the quick start, the tests and the benchmarks.

`make_sample(root, ...)` writes class directories of small incompressible "images" (random bytes,
sizes spread around a mean), a labels file, and optionally a few large shard files. The same seed
always gives the same bytes, so benchmarks are repeatable.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleSpec:
    small_files: int = 200
    small_mean: int = 110 * 1024
    classes: int = 10
    large_files: int = 0
    large_size: int = 32 << 20
    seed: int = 1


def make_sample(root: str | os.PathLike[str], spec: SampleSpec = SampleSpec()) -> tuple[int, int]:
    """Write the dataset under `root`; return (files, bytes)."""
    rng = random.Random(spec.seed)
    root = Path(root)
    files = total = 0
    labels = []
    per_class = max(1, spec.small_files // max(1, spec.classes))
    for i in range(spec.small_files):
        cls = f"class_{i // per_class:04d}"
        size = max(1, int(rng.gauss(spec.small_mean, spec.small_mean / 4)))
        path = root / "train" / cls / f"img_{i:08d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        labels.append(f"train/{cls}/{path.name},{cls}\n")
        files += 1
        total += size
    (root / "labels.csv").write_text("path,label\n" + "".join(labels))
    files += 1
    total += (root / "labels.csv").stat().st_size
    block = rng.randbytes(1 << 20)
    for j in range(spec.large_files):
        path = root / "shards" / f"shard_{j:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for k in range(spec.large_size >> 20):
                # Distinct per MiB (so chunks do not dedup) without generating GBs of randomness.
                f.write(j.to_bytes(4, "little") + k.to_bytes(4, "little") + block[8:])
            f.write(block[: spec.large_size & ((1 << 20) - 1)])
        files += 1
        total += spec.large_size
    return files, total


def main() -> None:
    import argparse

    from cachefs.names import parse_size

    p = argparse.ArgumentParser(description="write a synthetic ImageNet-like dataset")
    p.add_argument("directory")
    p.add_argument("--small-files", type=int, default=200)
    p.add_argument("--large-files", type=int, default=0)
    p.add_argument("--large-size", type=parse_size, default=32 << 20)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    files, total = make_sample(a.directory, SampleSpec(small_files=a.small_files,
                                                       large_files=a.large_files,
                                                       large_size=a.large_size, seed=a.seed))
    print(f"wrote {files} files, {total} bytes under {a.directory}")


if __name__ == "__main__":
    main()
