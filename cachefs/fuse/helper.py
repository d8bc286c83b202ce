"""`mount.cachefs`: the helper mount(8) runs for `mount -t fuse.cachefs` and fstab entries.

mount(8) calls `/sbin/mount.fuse.cachefs SOURCE MOUNTPOINT [-sfnv] -o OPTIONS` (link it to
this program). SOURCE is `DATASET[@REF]`; OPTIONS carry `cachefs mount` flags as `key=value`
(`remote`, `cache_dir`, `cache_size`, `memory_cache`, `read_threads`, `uid`, `gid`, `umask`,
`timeout`, `metrics`). Generic mount options (`ro`, `defaults`, `_netdev`, `nofail`, `noauto`,
`user`, `x-*`, ...) are accepted and ignored: a cachefs mount is always read-only.

    imagenet@v1  /mnt/imagenet  fuse.cachefs  remote=team,cache_dir=/nvme/cachefs,_netdev  0 0
"""

from __future__ import annotations

import sys

from cachefs.cli.main import main as cachefs_main

VALUE_OPTIONS = {"remote", "cache_dir", "cache_size", "memory_cache", "read_threads", "uid",
                 "gid", "umask", "timeout", "metrics"}
IGNORED = {"ro", "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev",
           "nofail", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
           "relatime", "allow_other"}


def translate(argv: list[str]) -> list[str]:
    """mount.cachefs argv -> `cachefs mount` argv."""
    positional: list[str] = []
    options: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.extend(next(args, "").split(","))
        elif arg.startswith("-o"):
            options.extend(arg[2:].split(","))
        elif arg in ("-s", "-f", "-n", "-v") or arg.startswith("-t"):
            if arg == "-t":
                next(args, None)
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.cachefs DATASET[@REF] MOUNTPOINT [-o OPTIONS]")
    out = ["mount", positional[0], positional[1]]
    for option in filter(None, options):
        key, eq, value = option.partition("=")
        if key in VALUE_OPTIONS and eq:
            out += [f"--{key.replace('_', '-')}", value]
        elif key in IGNORED or key.startswith("x-"):
            continue
        else:
            raise SystemExit(f"mount.cachefs: unknown option {option!r}")
    return out


def main() -> None:
    sys.exit(cachefs_main(translate(sys.argv[1:])))


if __name__ == "__main__":
    main()
