"""The storage server's Prometheus metrics (`cachefs storage serve --metrics-listen HOST:PORT`).

One `CollectorRegistry` per server (cachefs.metrics): RPCs by method and code and their latency
(`GrpcMetrics`, refused calls included), the time of each group-commit fdatasync (a histogram
fed by `GroupCommit.fsync_observer`), and at each scrape the figures of `VolumeStore.stat()`
(what `cachefs storage stat` prints: needles, bytes, reads, fsyncs, the memory cache) and of the
`StorageAgent` (heartbeats, repairs). Totals are always there; per-volume figures (label
`volume`) only for a data directory of at most `PER_VOLUME_MAX` volumes, so that a server of
thousands of volumes does not export thousands of series per figure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachefs.metrics import GrpcMetrics, StatsCollector, new_registry

log = logging.getLogger("cachefs.storage.metrics")

PREFIX = "cachefs_storage_"
PER_VOLUME_MAX = 256
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0)

# Figures of the store (`store_figures`) and of the agent (`StorageAgent.stats`): name -> help.
# Counters are exported with `_total` (StatsCollector adds it); the rest are gauges.
STORE_HELP = {
    "volumes": "logical volumes of this server's data directory",
    "segments": "segment files of every volume",
    "segment_bytes": "bytes of the segment files of every volume (live needles, deleted and "
                     "replaced ones, tombstones)",
    "needles": "live needles stored",
    "live_bytes": "bytes the live needles take in the segment files (header, data, footer, "
                  "padding)",
    "deleted_needles": "keys whose latest needle is a deletion (a tombstone), until compaction",
    "garbage_bytes": "bytes of the segment files not holding a live needle (deleted and "
                     "replaced needles, tombstones): what compaction would reclaim",
    "free_bytes": "free bytes (for unprivileged users) of the file system of the data "
                  "directory",
    "corrupt_reads": "needle reads that failed their checksum",
    "disk_reads": "needle reads from disk (without the memory cache: every read; with it: "
                  "its misses)",
    "direct_reads": "needle reads from disk with O_DIRECT (large needles not in the page "
                    "cache)",
    "fsyncs": "fsyncs and fdatasyncs made: of segment files by the group commit, of "
              "directories for new segments, of compaction outputs",
    "group_commits": "group-commit fdatasyncs of segment files (each makes every needle "
                     "written before it durable)",
    "index_commits": "LMDB transactions that committed staged needles to the index",
    "committed_needles": "needles and tombstones made durable (acknowledged writes)",
    "read_bytes": "needle data bytes read and answered (Get calls, verify)",
    "written_bytes": "needle data bytes newly written by puts (needles already stored are "
                     "skipped, and not counted)",
    "index_cache_entries": "index entries of recently read needles held in memory",
    "index_cache_capacity_entries": "most index entries held in memory (--index-cache)",
    "memory_cache_capacity_bytes": "bound of the needle memory cache (--memory-cache; 0: off)",
    "memory_cache_used_bytes": "bytes held by the needle memory cache",
    "memory_cache_entries": "needles held by the needle memory cache",
    "memory_cache_hits": "needle reads answered from the memory cache",
    "memory_cache_hit_bytes": "bytes of the needles answered from the memory cache",
    "memory_cache_misses": "needle reads the memory cache sent to disk",
    "memory_cache_shared_misses": "needle reads that waited for another caller's disk read "
                                  "of the same needle instead of making their own",
    "memory_cache_admissions": "needles admitted to the memory cache",
    "memory_cache_evictions": "needles evicted from the memory cache to make room",
    "memory_cache_admissions_refused": "needles not admitted to the memory cache (asked for "
                                       "less often than those they would evict, or too big)",
}
STORE_COUNTERS = ("corrupt_reads", "disk_reads", "direct_reads", "fsyncs", "group_commits",
                  "index_commits", "committed_needles", "read_bytes", "written_bytes",
                  "memory_cache_hits", "memory_cache_hit_bytes", "memory_cache_misses",
                  "memory_cache_shared_misses", "memory_cache_admissions",
                  "memory_cache_evictions", "memory_cache_admissions_refused")
# stat() document name -> figure name, where they differ
STAT_NAMES = {"preads": "disk_reads", "needles_committed": "committed_needles",
              "bytes_read": "read_bytes", "bytes_written": "written_bytes"}
MEMORY_CACHE_NAMES = ("capacity_bytes", "used_bytes", "entries", "hits", "hit_bytes", "misses",
                      "shared_misses", "admissions", "evictions", "admissions_refused")
VOLUME_HELP = {
    "segments": "segment files of the volume",
    "segment_bytes": "bytes of the volume's segment files",
    "needles": "live needles of the volume",
    "live_bytes": "bytes the volume's live needles take in its segment files",
    "deleted_needles": "keys of the volume whose latest needle is a deletion, until "
                       "compaction",
    "garbage_bytes": "bytes of the volume's segment files not holding a live needle (what "
                     "compacting it would reclaim)",
}
AGENT_HELP = {
    "heartbeats": "heartbeats the masters answered",
    "registered": "1 while this server is registered with the masters, else 0",
    "repairs_running": "repairs of a volume running now (copying from another replica)",
    "repairs_queued": "repairs the masters asked for, waiting to run",
    "repairs_succeeded": "repairs of a volume that finished",
    "repairs_failed": "repairs of a volume that failed (the masters ask again)",
    "repair_checked_needles": "needles of the source replicas that repairs compared",
    "repair_copied_needles": "needles repairs copied here from another replica",
    "repair_copied_bytes": "data bytes repairs copied here from another replica",
}
AGENT_COUNTERS = ("heartbeats", "repairs_succeeded", "repairs_failed",
                  "repair_checked_needles", "repair_copied_needles", "repair_copied_bytes")
FSYNC_HELP = ("time of one group-commit fdatasync of a segment file (what a durable write "
              "waits for)")


def volume_figures(row: Mapping[str, int]) -> dict[str, int]:
    """The figures of `VOLUME_HELP` from a stat() row (a volume's, or the totals). The index
    counts a live needle's whole length on disk in `live_bytes`, so the rest of the segment
    bytes is garbage; a needle written but not yet indexed is not there yet, so not below 0."""
    return {"segments": row["segments"], "segment_bytes": row["bytes"],
            "needles": row["live"], "live_bytes": row["live_bytes"],
            "deleted_needles": row["deleted"],
            "garbage_bytes": max(0, row["bytes"] - row["live_bytes"])}


def store_figures(doc: Mapping[str, Any]) -> dict[str, int]:
    """The figures of `STORE_HELP` from a `VolumeStore.stat()` document."""
    figures = {"volumes": doc["volumes"], "free_bytes": doc["free_bytes"],
               **volume_figures(doc["totals"])}
    for name in ("corrupt_reads", "preads", "direct_reads", "fsyncs", "group_commits",
                 "index_commits", "needles_committed", "bytes_read", "bytes_written"):
        figures[STAT_NAMES.get(name, name)] = doc[name]
    figures["index_cache_entries"] = doc["index_cache"]["entries"]
    figures["index_cache_capacity_entries"] = doc["index_cache"]["capacity"]
    cache = doc["memory_cache"]
    for name in MEMORY_CACHE_NAMES:
        if name in cache:  # a cache that is off has its capacity only
            figures[f"memory_cache_{name}"] = cache[name]
    return figures


class StoreCollector(Collector):
    """The store's figures, from one `stat()` per scrape: totals, and per volume where there
    are at most `PER_VOLUME_MAX`."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            doc = self.store.stat()
            flat = store_figures(doc)
        except Exception:  # a scrape never fails because one source did
            log.exception("metrics: the store's figures are unavailable")
            return
        yield from StatsCollector(PREFIX, lambda: flat, counters=STORE_COUNTERS,
                                  help_text=STORE_HELP).collect()
        if doc["volumes"] > PER_VOLUME_MAX:
            return
        rows = [(str(row["vid"]), volume_figures(row)) for row in doc["per_volume"]]
        for name, text in VOLUME_HELP.items():
            family = GaugeMetricFamily(f"{PREFIX}volume_{name}", text, labels=["volume"])
            for vid, figures in rows:
                family.add_metric([vid], figures[name])
            yield family


class StorageMetrics:
    """A storage server's registry: its RPCs (`grpc`, an observer for its gRPC server), its
    fsync times (hooked into `store.commit`), the store's figures, and the agent's
    (`agent_stats()`: {} without one)."""

    def __init__(self, store: Any,
                 agent_stats: Callable[[], Mapping[str, object]] = dict) -> None:
        self.registry = new_registry()
        self.grpc = GrpcMetrics(self.registry, PREFIX.rstrip("_"))
        self.fsync_seconds = Histogram(f"{PREFIX}fsync_seconds", FSYNC_HELP,
                                       registry=self.registry, buckets=FSYNC_BUCKETS)
        store.commit.fsync_observer = self.fsync_seconds.observe
        self.registry.register(StoreCollector(store))
        self.registry.register(StatsCollector(PREFIX, agent_stats, counters=AGENT_COUNTERS,
                                              help_text=AGENT_HELP))
