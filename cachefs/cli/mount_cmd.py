"""`cachefs mount|umount|mounts|stats|warmup`: versions as read-only directories."""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from cachefs.cache.compiled_reads import DEFAULT_THREADS as DEFAULT_READ_THREADS
from cachefs.cli.common import HelpFormatter, print_json, progress_for
from cachefs.config import Config
from cachefs.dataset.repo import Repository
from cachefs.errors import LocalIOError, MountError, NotFound, UsageError
from cachefs.names import format_size, parse_address, parse_size
from cachefs.remotes.registry import open_remote_url

MOUNT_EXAMPLES = """examples:
  cachefs mount imagenet@v1 /mnt/imagenet
  cachefs mount imagenet@main /mnt/imagenet --remote team --memory-cache 2GiB
  cachefs mount imagenet@3f2a9c1e /data --cache-dir /nvme/cachefs --cache-size 500GiB \\
      --uid 1000 --gid 1000 --umask 022 --metrics 127.0.0.1:9567
  cachefs umount /mnt/imagenet

The REF is resolved once: the mount shows exactly that commit, read-only, until unmounted.
Chunks and trees are served from memory, then the SSD cache (--cache-dir, shared by every mount
on the machine and kept across remounts and reboots), then the remote. fstab / mount -t:
  imagenet@v1  /mnt/imagenet  fuse.cachefs  remote=team,cache_dir=/nvme/cachefs,_netdev  0 0
(needs /sbin/mount.fuse.cachefs -> the mount.cachefs program installed with cachefs)."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    _register_mount(sub, common)
    _register_umount(sub, common)
    _register_mounts(sub, common)
    _register_stats(sub, common)
    _register_warmup(sub, common)


def _register_mount(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("mount", parents=[common], formatter_class=HelpFormatter,
                       help="mount a version as a read-only directory",
                       description="Mount DATASET@REF at MOUNTPOINT (read-only, FUSE). Returns "
                                   "once the mount serves; the daemon keeps running in the "
                                   "background and logs under the cache directory.",
                       epilog=MOUNT_EXAMPLES)
    p.add_argument("target", metavar="DATASET[@REF]")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--cache-dir", help="SSD cache directory (default: $XDG_CACHE_HOME/cachefs)")
    p.add_argument("--cache-size", type=parse_size,
                   help="SSD cache bound (default: half the free disk, keeping a free-space "
                        "floor)")
    p.add_argument("--memory-cache", type=parse_size, default="512MiB",
                   help="memory cache bound (default 512MiB)")
    p.add_argument("--read-threads", type=int, default=DEFAULT_READ_THREADS, metavar="N",
                   help="threads of the compiled read path, which answers reads of small "
                        "files from the SSD cache without the daemon's Python (0: off, every "
                        f"read in Python; default {DEFAULT_READ_THREADS})")
    p.add_argument("--uid", type=int, help="owner of every file (default: you)")
    p.add_argument("--gid", type=int, help="group of every file (default: your group)")
    p.add_argument("--umask", type=lambda v: int(v, 8), default=0,
                   help="bits removed from every mode, octal (default 0)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds before an uncached read that the origin cannot serve fails "
                        "with EIO (default 30)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (always on when mounted by root)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the version in the remote (by default gc keeps a mounted "
                        "version while the mount lives, even once no ref reaches it)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground, logging to stderr, until unmounted")
    peers = p.add_argument_group(
        "peer tier", "ask other nodes' caches before the origin: each chunk has one owner "
        "among the peers (rendezvous hashing), which fetches it from the origin once for "
        "everyone (start one `cachefs peer serve` per node on its --cache-dir)")
    peers.add_argument("--cache-peers", metavar="SOURCE,...",
                       help="where the ring's members come from, any of: HOST:PORT (a peer "
                            "server, as it advertises itself), dns:NAME:PORT (every A/AAAA "
                            "record of NAME, re-resolved every 10 s: a headless Service), "
                            "file:PATH (as --cache-peers-file), master:REMOTE (the live nodes "
                            "of the node registry of the haystack cluster behind the "
                            "configured remote REMOTE)")
    peers.add_argument("--cache-peers-file", metavar="FILE",
                       help="a file listing them (comma-, space- or line-separated; # "
                            "comments), re-read when it changes")
    peers.add_argument("--peer-scope", choices=("all", "dataset"), default="all",
                       help="dataset: only the nodes registered (`cachefs peer serve "
                            "--register`) as serving this very version form the ring of the "
                            "master: sources, so jobs on other datasets do not evict its "
                            "chunks from their owners (default: all)")
    peers.add_argument("--token-file", metavar="FILE",
                       help="file holding the cluster token for peer calls (default: the "
                            "CACHEFS_TOKEN environment variable)")
    p.set_defaults(func=mount)


def _register_umount(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("umount", parents=[common], formatter_class=HelpFormatter,
                       help="unmount a cachefs mount",
                       description="Unmount MOUNTPOINT and wait for its daemon to exit. A "
                                   "daemon that does not answer (HUNG in `cachefs mounts`) is "
                                   "refused: --force aborts its FUSE connection, kills it and "
                                   "detaches the mount; programs still using it get "
                                   "\"transport endpoint is not connected\".",
                       epilog="examples:\n  cachefs umount /mnt/imagenet\n"
                              "  cachefs umount /mnt/imagenet --lazy\n"
                              "  cachefs umount /mnt/imagenet --force\n")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if busy; the daemon exits when the last file closes")
    p.add_argument("--force", "-f", action="store_true",
                   help="do not ask the daemon: abort its FUSE connection (root, or the user "
                        "who mounted), kill it and detach the mount")
    _answer_timeout(p)
    p.set_defaults(func=umount)


def _register_mounts(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("mounts", parents=[common], formatter_class=HelpFormatter,
                       help="list the cachefs mounts of this machine",
                       description="List every cachefs mount with what it serves. A mount "
                                   "whose daemon is gone shows as DEAD; one whose daemon does "
                                   "not answer within --timeout (stopped, stuck) as HUNG: "
                                   "`cachefs umount --force` it. --json gives each a \"state\": "
                                   "serving, dead or hung.",
                       epilog="examples:\n  cachefs mounts\n  cachefs mounts --json\n")
    _answer_timeout(p)
    p.set_defaults(func=mounts)


def _register_stats(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("stats", parents=[common], formatter_class=HelpFormatter,
                       help="cache and read statistics of a mount",
                       epilog="examples:\n  cachefs stats /mnt/imagenet\n"
                              "  cachefs stats /mnt/imagenet --json | jq .ssd_hits\n")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _answer_timeout(p)
    p.set_defaults(func=stats)


def _register_warmup(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("warmup", parents=[common], formatter_class=HelpFormatter,
                       help="prefetch files of a mount into the SSD cache",
                       description="Fetch everything below each PATH (files or directories "
                                   "inside a cachefs mount) into the SSD cache, in parallel.",
                       epilog="examples:\n  cachefs warmup /mnt/imagenet\n"
                              "  cachefs warmup /mnt/imagenet/train/n01440764 --workers 32\n")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--workers", type=int, default=16, help="files in flight (default 16)")
    _answer_timeout(p)
    p.set_defaults(func=warmup)


def _answer_timeout(parser: argparse.ArgumentParser) -> None:
    from cachefs.fuse.mount import ANSWER_TIMEOUT_S

    parser.add_argument("--timeout", type=_positive_seconds, default=ANSWER_TIMEOUT_S,
                        metavar="SECONDS",
                        help="how long a mount daemon may take to answer before it counts as "
                             f"hung (default {ANSWER_TIMEOUT_S:g})")


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def mount(args: argparse.Namespace) -> int:
    from cachefs.fuse import mount as mounts_api
    from cachefs.fuse.config import MountConfig, default_cache_dir

    address = parse_address(args.target, allow_path=False)
    mountpoint = mounts_api.check_mountpoint(args.mountpoint)
    settings = Config.load()
    remote_arg = args.remote or settings.default_remote
    remote_url = settings.url_of(remote_arg)  # with its options
    remote_name = remote_arg if "://" not in remote_arg else next(
        (name for name, url in sorted(settings.all_remotes().items()) if url == remote_arg),
        None)
    cache_peers = None
    if args.cache_peers is not None:
        from cachefs.peer.sources import parse_specs

        cache_peers = parse_specs(args.cache_peers)
        if not cache_peers:
            raise UsageError("--cache-peers: no member given")
    if args.peer_scope == "dataset" and cache_peers is None:
        raise UsageError("--peer-scope dataset: needs --cache-peers with a master:REMOTE source")
    if args.token_file:
        from cachefs.grpc_auth import load_token

        load_token(args.token_file)  # readable and not empty, before anything starts
    repo = Repository(open_remote_url(remote_url))
    resolved = repo.resolve(address.dataset, address.ref)
    if cache_peers is not None:
        from cachefs.peer.sources import build_sources, scoped

        if args.peer_scope == "dataset":
            cache_peers = scoped(cache_peers, address.dataset, resolved.commit)
        for source in build_sources(cache_peers):  # a master: remote must be configured
            source.close()
    uid, gid = MountConfig.user_ids()
    config = MountConfig(
        remote_url=remote_url,
        dataset=address.dataset, ref=address.ref_or_default, commit=resolved.commit,
        mountpoint=mountpoint, cache_dir=os.path.abspath(args.cache_dir or default_cache_dir()),
        cache_size=args.cache_size, memory_cache=args.memory_cache,
        read_threads=args.read_threads,
        uid=uid if args.uid is None else args.uid, gid=gid if args.gid is None else args.gid,
        umask=args.umask, origin_timeout=args.timeout, metrics=args.metrics,
        allow_other=args.allow_other or os.getuid() == 0, pin=args.pin,
        remote_name=remote_name, cache_peers=cache_peers,
        cache_peers_file=(os.path.abspath(args.cache_peers_file) if args.cache_peers_file
                          else None),
        token_file=os.path.abspath(args.token_file) if args.token_file else None,
    )
    info = mounts_api.start(config, foreground=args.foreground)
    if args.json:
        print_json(info)
    elif not args.foreground:
        print(f"mounted {address.dataset}@{config.ref} ({config.commit[:12]}) at {mountpoint}")
    return 0


def umount(args: argparse.Namespace) -> int:
    from cachefs.fuse import mount as mounts_api

    if args.force:
        result = mounts_api.force_unmount(args.mountpoint)
        if args.json:
            print_json({"unmounted": result["mountpoint"], "lazy": True, "forced": True,
                        "pid": result["pid"], "aborted": result["aborted"]})
        else:
            daemon = f"; daemon {result['pid']} killed" if result["pid"] else ""
            print(f"unmounted {args.mountpoint} (forced: connection "
                  f"{'aborted' if result['aborted'] else 'not aborted'}{daemon})")
        return 0
    mounts_api.unmount(args.mountpoint, lazy=args.lazy, answer_timeout=args.timeout)
    if args.json:
        print_json({"unmounted": mounts_api.resolve_mountpoint(args.mountpoint),
                    "lazy": args.lazy, "forced": False})
    else:
        print(f"unmounted {args.mountpoint}" + (" (lazily)" if args.lazy else ""))
    return 0


def mounts(args: argparse.Namespace) -> int:
    from cachefs.fuse import mount as mounts_api

    points = mounts_api.cachefs_mounts()
    # At once: each hung daemon costs the answer timeout, not one per mount in a row.
    with ThreadPoolExecutor(max(1, min(16, len(points)))) as pool:
        rows = list(pool.map(lambda m: mounts_api.mount_info(m, args.timeout), points))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no cachefs mounts", file=sys.stderr)
    for r in rows:
        point = r["mountpoint"]
        if r["state"] == "dead":
            print(f"{point}  DEAD (daemon gone; run: cachefs umount {point})")
        elif r["state"] == "hung":
            daemon = f"daemon pid {r['pid']}" if r.get("pid") else "its daemon"
            print(f"{point}  HUNG ({daemon} does not answer within {args.timeout:g} s; "
                  f"run: cachefs umount --force {point})")
        else:
            print(f"{point}  {r['dataset']}@{r['ref']} {str(r['commit'])[:12]}  "
                  f"pid {r['pid']}  cache {r['cache_dir']}")
    return 0


def stats(args: argparse.Namespace) -> int:
    from cachefs.fuse import mount as mounts_api

    figures = mounts_api.mount_stats(args.mountpoint, args.timeout)
    if args.json:
        print_json(figures)
        return 0
    for key, value in figures.items():
        if key.endswith("bytes") or key.endswith("bytes_used"):
            value = f"{value} ({format_size(value)})"  # type: ignore[arg-type]
        elif isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<32} {value}")
    return 0


def _files_below(paths: list[str]) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []
    for path in paths:
        if not os.path.exists(path):
            raise NotFound(f"{path} does not exist")
        if os.path.isfile(path) and not os.path.islink(path):
            files.append((path, os.path.getsize(path)))
            continue
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if not os.path.islink(full):
                    files.append((full, st.st_size))
    return files


def _check_answering(paths: list[str], timeout: float) -> None:
    """Fail fast, before walking them, if a mount the paths lie in does not answer."""
    from cachefs.fuse import mount as mounts_api

    points = {mounts_api.mount_containing(path) for path in paths} - {None}
    for point in sorted(p for p in points if p is not None):
        if mounts_api.mount_info(point, timeout)["state"] == "hung":
            raise mounts_api.hung_error(point, timeout)


def warmup(args: argparse.Namespace) -> int:
    from cachefs.fs import XATTR_WARMUP

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    _check_answering(args.paths, args.timeout)
    files = _files_below(args.paths)
    progress = progress_for(args)
    progress.start(sum(size for _, size in files), "B", "warmup")
    fetched = 0

    def warm(item: tuple[str, int]) -> int:
        path, size = item
        try:
            value = int(os.getxattr(path, XATTR_WARMUP.decode()))
        except OSError as e:
            if e.errno in (61, 95):  # ENODATA / ENOTSUP: not inside a cachefs mount
                raise MountError(f"{path} is not inside a cachefs mount") from e
            raise LocalIOError(f"warming {path} failed: {e.strerror}") from e
        progress.update(size)
        return value

    try:
        with ThreadPoolExecutor(args.workers) as pool:
            for value in pool.map(warm, files):
                fetched += value
    finally:
        progress.close()
    total = sum(size for _, size in files)
    if args.json:
        print_json({"files": len(files), "bytes": total, "fetched_bytes": fetched})
    else:
        print(f"warmed {len(files)} files ({format_size(total)}); fetched "
              f"{format_size(fetched)} from the remote")
    return 0
