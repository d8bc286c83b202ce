"""The mount daemon: one process per mount, serving one commit through pyfuse3 and trio.

Started by `cachefs mount` (in the background, or in the foreground with --foreground) with a
`MountConfig` as JSON and a pipe to report readiness on: it writes `ok` once the kernel mount
exists, or `error: ...` if it could not mount, so the command that started it can return only
when the mount serves, or fail with the reason. It logs to a file under the cache directory.
Once mounted, it records the version it serves in CACHE_DIR/versions/ (what the node
inventory reports as cached; `cachefs.cache.versions`).

It pins the commit it serves (`cachefs.dataset.pins`: a lease of DEFAULT_LEASE_S, 10 minutes,
renewed every DEFAULT_RENEW_S, 1 minute, on a worker thread) so gc keeps it while mounted, and
removes the pin when it unmounts. Readiness waits for the pin at most PIN_READY_WAIT_S: a pin
held back by a running gc sweep is finished in the background. A remote these credentials cannot
write (read-only keys on nodes) is mounted anyway, unpinned: one warning in the log, and
`pinned: false` in `cachefs stats`.

With --cache-peers (or --cache-peers-file) it asks the peer ring for chunks its caches miss
before the origin (`cachefs.cache.peer`), probing members that went away on a thread of its own.

With --metrics HOST:PORT it serves Prometheus metrics at http://HOST:PORT/metrics
(`cachefs.metrics`): the figures of `cachefs stats` as `cachefs_mount_*` (MOUNT_METRICS: events
as counters, `..._total`; levels as gauges), labelled with the dataset and the commit, and for
one release the names it served before (`cachefs_<key>`, every figure a gauge) as deprecated
aliases. The figures are read on the trio thread, at each scrape. The peer ring's quarantines
are this mount's decision, so they are exported here (`cachefs_mount_quarantined_peers`,
`cachefs_mount_peer_corrupt_total`), not by the peer servers.

Once serving, it raises the mount's kernel readahead (`read_ahead_kb` of its bdi, root only) so
sequential reads arrive as large requests (up to 1 MiB, libfuse's max_pages). SIGTERM or
SIGINT unmount cleanly; an external `fusermount3 -u` (what `cachefs umount` does) ends the main
loop the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pyfuse3
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachefs.cache.disk import DiskCache
from cachefs.cache.memory import MemoryCache
from cachefs.cache.peer import PeerTier
from cachefs.cache.tiered import TIER_FIGURES, TieredStore, object_is_intact
from cachefs.cache.versions import record_version
from cachefs.dataset.pins import DEFAULT_RENEW_S, LeasedPin, PinLost, PinStore
from cachefs.dataset.refs import who_am_i
from cachefs.dataset.repo import Repository
from cachefs.errors import CachefsError, PermissionDenied
from cachefs.fs import DatasetFS, MountOptions
from cachefs.fuse.config import MountConfig
from cachefs.fuse.operations import COMPILED_READS, CachefsOperations
from cachefs.grpc_auth import load_token
from cachefs.metrics import MetricsEndpoint, StatsCollector, new_registry
from cachefs.peer.members import Membership
from cachefs.remotes.registry import open_remote_url

log = logging.getLogger("cachefs.daemon")

DECODED_ENTRY_BYTES = 720  # a decoded tree entry in memory (measured: benchmarks.scale)
MIN_TREE_CACHE_ENTRIES = 10_000
PIN_READY_WAIT_S = 10.0  # readiness waits this long for the pin, then pinning goes on behind
PIN_LOCK_WAIT_S = 300.0  # a gc sweep longer than this: the next renewal tick tries again
_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"ro", "fsname=cachefs", "subtype=cachefs", "noatime"}
    if config.allow_other:
        options.add("allow_other")
    return options


def mount_device(mountpoint: str) -> str | None:
    """major:minor of the file system mounted at `mountpoint` (an absolute, resolved path).

    Reads mountinfo only: the daemon must not stat its own mount point before its main loop
    runs (the request would wait for the very process that sends it).
    """
    real = mountpoint
    with open("/proc/self/mountinfo") as f:
        found = None
        for line in f:
            fields = line.split()
            if unescape_mount_path(fields[4]) == real:
                found = fields[2]  # the last (topmost) mount there wins
        return found


def unescape_mount_path(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space, etc.)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def tune_kernel_after_init(config: MountConfig) -> None:
    """Larger kernel readahead for this mount (root only; skipped quietly otherwise).

    The kernel sets the mount's readahead from the FUSE INIT reply, which the main loop sends:
    so this runs on a worker thread once the loop serves (a stat of the mount point, answered by
    the loop, proves it), or the kernel would overwrite the value.
    """
    try:
        os.stat(config.mountpoint)
    except OSError as e:
        log.info("mount point not answering, readahead left as is: %s", e)
        return
    device = mount_device(config.mountpoint)
    if device is None:
        return
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        path.write_text(str(config.read_ahead_kb))
        log.info("read_ahead_kb of %s set to %d", device, config.read_ahead_kb)
    except OSError as e:
        log.info("could not raise readahead (%s): %s", path, e)
    background = Path(f"/sys/fs/fuse/connections/{device.split(':')[1]}/max_background")
    try:
        background.write_text("64")
    except OSError as e:
        log.info("could not raise max_background (%s): %s", background, e)


# The mount's figures (`DatasetFS.stats()`, what `cachefs stats` shows) as Prometheus metrics:
# (key in stats, metric name after ``cachefs_mount_``, whether it counts events, help text).
# Counters get ``_total``; the rest are levels (gauges). The tiers' figures are the ones
# `TIER_FIGURES` declares for every door. Every sample carries the labels dataset and commit.
# A numeric figure missing here is not exported under a new name (only as its
# deprecated alias): tests/test_metrics_peer_mount.py checks that every one is listed.
MOUNT_METRICS: tuple[tuple[str, str, bool, str], ...] = (
    ("read_requests", "read_requests", True,
     "READ requests answered (Python and compiled read paths)"),
    ("read_bytes", "read_bytes", True, "bytes answered to READ requests"),
    ("read_throughput_bytes_per_s", "read_throughput_bytes_per_second", False,
     "read_bytes over the uptime (an average since mounting: prefer "
     "rate(cachefs_mount_read_bytes_total))"),
    ("compiled_reads_answered", "compiled_reads_answered", True,
     "READ requests answered by the compiled read path from the SSD tier"),
    ("compiled_reads_inline", "compiled_reads_inline", True,
     "READ requests the compiled read path answered on the FUSE thread itself"),
    ("compiled_reads_handed_back", "compiled_reads_handed_back", True,
     "READ requests the compiled read path handed back to Python (a chunk not on SSD)"),
    ("compiled_reads_declined", "compiled_reads_declined", True,
     "READ requests the compiled read path declined to answer (left to Python at once)"),
    ("compiled_reads_left_to_memory", "compiled_reads_left_to_memory", True,
     "READ requests the compiled read path left to Python because the memory tier holds "
     "their chunk"),
    ("bad_extents", "bad_extents", True,
     "reads refused because a file's extent did not fit its chunk (a corrupt tree)"),
    ("open_requests", "open_requests", True, "OPEN requests the kernel sent"),
    *((key, key, counter, text) for key, counter, text in TIER_FIGURES),
    ("uptime_s", "uptime_seconds", False, "seconds since the mount daemon started serving"),
    ("inodes", "inodes", False, "inodes the kernel may still ask about"),
    ("open_files", "open_files", False, "files open on the mount now"),
    ("pinned", "pinned", False, "1 while this mount's version is pinned (kept from gc)"),
    ("compiled_reads", "compiled_reads", False,
     "1 when the compiled read path answers READs from the SSD tier"),
    ("fuse_no_open", "fuse_no_open", False,
     "1 when opening a file costs no OPEN request (kernel and pyfuse3 support)"),
)
ALIAS_REUSE_S = 1.0  # an alias scrape reuses the figures read for the new names this recently


class MountFigures:
    """The mount's figures, read from a scrape's thread on the mount's trio thread (the state
    `DatasetFS.stats()` reads is that thread's). `fresh()` reads them; `recent()` reuses the
    last reading when it is at most ALIAS_REUSE_S old, so that one scrape shows the new names
    and their deprecated aliases with the same values, for one hop to the trio thread."""

    def __init__(self, fs: DatasetFS, token: trio.lowlevel.TrioToken) -> None:
        self.fs = fs
        self.token = token
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, object]] | None = None

    def fresh(self) -> dict[str, object]:
        figures = trio.from_thread.run_sync(self.fs.stats, trio_token=self.token)
        with self._lock:
            self._last = (time.monotonic(), figures)
        return figures

    def recent(self) -> dict[str, object]:
        with self._lock:
            last = self._last
        if last is not None and time.monotonic() - last[0] <= ALIAS_REUSE_S:
            return last[1]
        return self.fresh()


def mount_registry(fs: DatasetFS, token: trio.lowlevel.TrioToken) -> CollectorRegistry:
    """The mount's metrics: `cachefs_mount_*` (MOUNT_METRICS), and for one release the names
    the mount served before, `cachefs_<key>` gauges, as deprecated aliases."""
    figures = MountFigures(fs, token)
    labels = {"dataset": str(fs.info.get("dataset")), "commit": str(fs.info.get("commit"))}

    def named() -> dict[str, object]:
        current = figures.fresh()
        return {name: current[key] for key, name, _, _ in MOUNT_METRICS if key in current}

    registry = new_registry()
    registry.register(StatsCollector(
        "cachefs_mount_", named, labels=labels,
        counters=[name for _, name, counter, _ in MOUNT_METRICS if counter],
        help_text={name: text for _, name, _, text in MOUNT_METRICS}))
    registry.register(DeprecatedAliases(figures.recent, labels))
    return registry


class DeprecatedAliases(Collector):
    """The names the mount served before `cachefs_mount_*`, exactly as it served them: every
    numeric figure of `stats` (booleans left out) as a gauge `cachefs_<key>`, labels dataset
    and commit. Kept for one release so that dashboards do not break; then drop this collector
    (and `MountFigures.recent`)."""

    def __init__(self, stats: Callable[[], Mapping[str, object]],
                 labels: Mapping[str, str]) -> None:
        self._stats = stats
        self.labels = dict(labels)
        self.new_names = {key: f"cachefs_mount_{name}{'_total' if counter else ''}"
                          for key, name, counter, _ in MOUNT_METRICS}

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._stats()
        except Exception:  # a scrape never fails because the figures could not be read
            log.exception("metrics: the mount's figures are unavailable")
            return
        for key, value in sorted(figures.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            new = self.new_names.get(key)
            text = (f"deprecated alias of {new}, removed in the next release" if new else
                    f"deprecated: the mount's figure {key} (`cachefs stats`), removed in the "
                    "next release")
            family = GaugeMetricFamily(f"cachefs_{key}", text, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family


def mount_pin(fs: DatasetFS, config: MountConfig) -> LeasedPin | None:
    """The pin this mount will hold (None with --no-pin)."""
    if not config.pin:
        return None
    holder = f"{who_am_i()} pid {os.getpid()} mount {config.mountpoint}"
    store = PinStore(fs.store.repo.remote, lock_wait_s=PIN_LOCK_WAIT_S)
    return LeasedPin(store, config.dataset, config.commit, holder)


def _refused(error: BaseException) -> bool:
    """Whether the remote refused to be written (read-only credentials or file system)."""
    if isinstance(error, PermissionDenied):
        return True
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in _REFUSED_ERRNOS


async def keep_pinned(pin: LeasedPin, fs: DatasetFS, attempted: trio.Event) -> None:
    """Create the mount's pin, then renew it until cancelled (the daemon removes it after).

    A remote that refuses writes leaves the mount unpinned for good; other failures (a store
    outage, a long gc sweep) are retried at each renewal tick. One warning either way."""
    warned = False
    fs.status["pinned"] = False
    fs.status["pin"] = pin.name
    while True:
        try:
            # Abandoned on cancel: release() removes a pin whose creation finishes afterwards.
            if fs.status["pinned"]:
                await trio.to_thread.run_sync(pin.renew, abandon_on_cancel=True)
            else:
                await trio.to_thread.run_sync(pin.create, abandon_on_cancel=True)
                log.info("pinned %s as %s", config_text(pin), pin.name)
            fs.status["pinned"] = True
        except PinLost as e:
            fs.status["pinned"] = False
            log.warning("%s: this mount's version is no longer kept from gc", e)
            return
        except Exception as e:
            fs.status["pinned"] = pin.fresh
            if not warned:
                warned = True
                log.warning("could not pin %s (%s); mounted anyway, but gc may remove what "
                            "this mount has not cached", config_text(pin), e)
            else:
                log.info("pin %s: %s", pin.name, e)
            if _refused(e) and not pin.fresh:
                return
        finally:
            attempted.set()
        await trio.sleep(DEFAULT_RENEW_S)


def config_text(pin: LeasedPin) -> str:
    return f"{pin.dataset}@{pin.commit[:12]}"


async def serve(fs: DatasetFS, config: MountConfig, report: Callable[[str], None],
                pin: LeasedPin | None = None) -> None:
    metrics = None
    async with trio.open_nursery() as nursery:
        fs.nursery = nursery
        if config.metrics:
            registry = mount_registry(fs, trio.lowlevel.current_trio_token())
            metrics = MetricsEndpoint(config.metrics, registry, "--metrics").start()
            log.info("metrics at %s/metrics", metrics.url)
        nursery.start_soon(_stop_on_signal, nursery)
        pinned = trio.Event()
        if pin is None:
            pinned.set()
        else:
            nursery.start_soon(keep_pinned, pin, fs, pinned)
        nursery.start_soon(_tune_then_report_ready, config, report, pinned)
        if fs.compiled is not None:
            nursery.start_soon(fs.compiled.serve_handed_back, pyfuse3.read_by_inode)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=128)
        finally:
            if metrics is not None:
                metrics.stop()
            nursery.cancel_scope.cancel()


async def _tune_then_report_ready(config: MountConfig, report: Callable[[str], None],
                                  pinned: trio.Event) -> None:
    await trio.to_thread.run_sync(tune_kernel_after_init, config, abandon_on_cancel=True)
    with trio.move_on_after(PIN_READY_WAIT_S):
        await pinned.wait()
    log.info("serving %s@%s (%s) at %s", config.dataset, config.ref, config.commit,
             config.mountpoint)
    report("ok")


async def _stop_on_signal(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def peer_tier(config: MountConfig, chunk_size: int) -> PeerTier | None:
    """The mount's peer tier (started: it probes members that went away), or None."""
    if not config.peers_wanted:
        return None
    assert config.remote_name is not None  # MountConfig refuses peers without it
    membership = Membership(config.cache_peers, config.cache_peers_file,
                            load_token(config.token_file))
    membership.start()
    log.info("peer tier: %d members (%s)", len(membership.members()),
             config.cache_peers_file or ", ".join(membership.members()))
    return PeerTier(membership, config.remote_name, config.dataset, chunk_size,
                    origin_timeout=config.origin_timeout)


def build_fs(config: MountConfig) -> DatasetFS:
    repo = Repository(open_remote_url(config.remote_url))
    chunk_size = repo.dataset(config.dataset).chunk_size
    disk = DiskCache(Path(config.cache_dir), capacity_bytes=config.cache_size,
                     verify=object_is_intact)
    # --memory-cache bounds both in-memory caches: 3/4 for chunks, 1/4 for decoded trees.
    tree_entries = max(MIN_TREE_CACHE_ENTRIES, config.memory_cache // 4 // DECODED_ENTRY_BYTES)
    store = TieredStore(repo, MemoryCache(config.memory_cache * 3 // 4), disk,
                        origin_timeout=config.origin_timeout,
                        origin_parallelism=config.origin_parallelism,
                        tree_cache_entries=tree_entries,
                        peer=peer_tier(config, chunk_size))
    commit = trio.run(store.commit, config.commit)
    info = {
        "dataset": config.dataset, "ref": config.ref, "commit": config.commit,
        "remote": config.remote_url.split("?")[0], "mountpoint": config.mountpoint,
        "pid": os.getpid(), "cache_dir": config.cache_dir, "log_file": str(config.log_path),
        "files": commit.files, "bytes": commit.bytes,
    }
    options = MountOptions(uid=config.uid, gid=config.gid, umask=config.umask)
    return DatasetFS(store, config.commit, commit.tree, commit.time_ns, chunk_size, options,
                     info)


def start_compiled_reads(fs: DatasetFS, config: MountConfig) -> None:
    """Run the disk tier's compiled read path for this mount, where it can run: its threads
    answer READs from the SSD tier before Python sees them (see
    cachefs.cache.compiled_reads). Before the first request, so every inode is registered."""
    why = ("--read-threads 0" if config.read_threads == 0
           else None if COMPILED_READS else "pyfuse3 without cachefs's read hook (patches/)")
    disk = fs.store.disk
    if why is None and not isinstance(disk, DiskCache):
        why = "no disk tier"
    if why is None:
        assert isinstance(disk, DiskCache)
        compiled = None
        try:
            compiled = disk.compiled_reads(config.read_threads)
            compiled.start()
            compiled.leave_to_python(*fs.store.keys_in_memory())
            pyfuse3.set_read_hook(compiled.hook)
        except Exception as e:  # the mount is up by now: serve it without the path
            if not isinstance(e, RuntimeError):  # RuntimeError: it cannot run here (said below)
                log.exception("the compiled read path failed to start")
            if compiled is not None and compiled.running:
                compiled.stop()
            why = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        else:
            fs.compiled = compiled
            fs.status["compiled_reads_crc"] = compiled.crc_implementation()
    fs.status["compiled_reads"] = why is None
    if why is not None:
        log.info("files are read in Python: no compiled read path (%s)", why)


def stop_compiled_reads(fs: DatasetFS) -> None:
    """Before the session ends: the engine holds requests of it until it has stopped."""
    if fs.compiled is not None:
        pyfuse3.set_read_hook(None)
        fs.compiled.stop()


def run(config: MountConfig, ready_fd: int | None) -> int:
    """Mount and serve until unmounted; report readiness on `ready_fd`. Returns an exit code."""
    reported = False

    def report(message: str) -> None:
        nonlocal reported
        if ready_fd is not None and not reported:
            reported = True
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)

    try:
        fs = build_fs(config)
        pyfuse3.init(CachefsOperations(fs), config.mountpoint, fuse_options(config))
    except (CachefsError, OSError, RuntimeError) as e:
        log.error("mount failed: %s", e)
        report(f"error: {e}")
        return 1
    except BaseException as e:
        log.exception("mount failed")
        report(f"error: {type(e).__name__}: {e}")
        return 1
    start_compiled_reads(fs, config)  # never raises: without it, Python reads every file
    # What the node inventory reports as cached here (best effort: failures are only logged).
    # A commit mounted by its hash (prefix) adds no ref.
    ref = "" if config.commit.startswith(config.ref) else config.ref
    record_version(config.cache_dir, config.dataset, config.commit,
                   config.remote_url.split("?")[0], ref)
    pin = mount_pin(fs, config)
    try:
        trio.run(serve, fs, config, report, pin)
    except BaseException as e:
        log.exception("mount daemon failed")
        report(f"error: {type(e).__name__}: {e}")
        stop_compiled_reads(fs)
        pyfuse3.close(unmount=True)
        unpin(pin)
        return 1
    stop_compiled_reads(fs)
    pyfuse3.close(unmount=True)
    unpin(pin)
    log.info("unmounted %s", config.mountpoint)
    return 0


def unpin(pin: LeasedPin | None) -> None:
    """Remove the mount's pin (best effort: a pin left behind expires with its lease)."""
    if pin is None:
        return
    try:
        pin.release()
    except Exception as e:
        log.warning("could not remove pin %s (it expires by itself): %s", pin.name, e)


def main() -> None:
    config = MountConfig.from_json(sys.argv[1])
    ready_fd = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    if ready_fd is not None:
        config.log_path.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(filename=config.log_path, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(config, ready_fd))


if __name__ == "__main__":
    main()
