"""The peer tier: a chunk this node's caches miss, asked of the member of the ring that owns it.

Between the SSD tier and the origin (`tiered.py`). A chunk's owner is the first member of its
rendezvous ranking over the live members (`cachefs/peer/ring.py`); the owner answers from its
SSD cache or fetches the chunk from the origin once for everyone (`cachefs/peer/server.py`), so
N nodes reading one dataset read it from the origin about once. The node's own peer server is a
member like any other, so a chunk this node owns is fetched through it too: a node's mounts and
its server never both fetch one chunk (the server's single flight covers both).

Never slower than the origin, never wrong:
- a chunk is asked of its owner in two calls: from its cache only, with a short deadline
  (`deadline_floor_s`, 2 s, or four times the recent latency of such answers, plus the chunk's
  size at `min_rate` bytes/s), then, if it does not hold it, asking it to fetch from the origin
  once for everyone, with a deadline of its own (at least 10 s, or four times the recent time of
  such fetches or of the mount's own origin reads, never more than the mount's origin timeout):
  an owner fetching through a busy origin link is as slow as we would be, and going there too
  would only load the link twice. Past either deadline the reader goes to the origin itself (a
  hedged request, counted in `hedged_requests` and `peer_timeouts`); a member that misses the
  short deadline three times in a row leaves the ring until it answers a probe.
- an unreachable member leaves the ring at once and the next-ranked member is asked
  (`cachefs/peer/members.py`); after `max_members` members the reader goes to the origin.
- every chunk is verified against its name; one that fails quarantines the member (counted in
  `peer_corrupt`, logged with the member and the chunk) and is never returned.
- refusals (a wrong token, a remote the member does not serve) are counted in `peer_errors`
  and logged (at most once a minute per kind); the reader goes on to the next member.
Requests name the remote by its configured name and the dataset; never a URL.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from cachefs.cache.base import TierStats
from cachefs.dataset.objects import hash_bytes
from cachefs.peer import ring
from cachefs.peer.client import PeerCallError
from cachefs.peer.members import Membership

log = logging.getLogger("cachefs.cache.peer")

DEFAULT_DEADLINE_FLOOR_S = 2.0
DEFAULT_MIN_RATE = 20_000_000  # bytes/s a member must at least deliver a chunk at
DEFAULT_MAX_MEMBERS = 2  # the owner, then the next-ranked one
LATENCY_WEIGHT = 0.2  # of a new sample in the latency EWMA
LATENCY_FACTOR = 4.0  # a deadline is at least this many times the recent latency
FETCH_FLOOR_S = 10.0  # the least an owner is given to fetch a chunk from the origin for us
DEFAULT_ORIGIN_TIMEOUT_S = 30.0  # the mount's --timeout: no peer wait outlasts it
LOG_INTERVAL_S = 60.0
# The mount's counters of this tier (`cachefs stats`; zeros without peers).
PEER_KEYS = ("peer_hits", "peer_bytes", "peer_errors", "peer_timeouts", "hedged_requests",
             "peer_corrupt", "peer_misses", "quarantined_peers", "live_peers")


@dataclass
class PeerStats:
    hits: int = 0
    bytes: int = 0
    errors: int = 0
    timeouts: int = 0
    hedged: int = 0
    corrupt: int = 0
    misses: int = 0  # asked, and no member had it (or none could be asked)


class PeerTier:
    """The `CacheTier` named "peer" of one mount: `membership` (the ring), the `remote` name
    configured on every node, the `dataset` read. `get` blocks (gRPC): call it from a worker
    thread."""

    name = "peer"

    def __init__(self, membership: Membership, remote: str, dataset: str, chunk_size: int, *,
                 origin_timeout: float = DEFAULT_ORIGIN_TIMEOUT_S,
                 deadline_floor_s: float = DEFAULT_DEADLINE_FLOOR_S,
                 min_rate: float = DEFAULT_MIN_RATE,
                 max_members: int = DEFAULT_MAX_MEMBERS) -> None:
        self.membership = membership
        self.remote = remote
        self.dataset = dataset
        self.chunk_size = chunk_size
        self.origin_timeout = origin_timeout
        self.deadline_floor_s = deadline_floor_s
        self.min_rate = min_rate
        self.max_members = max_members
        self._lock = threading.Lock()
        self._stats = PeerStats()
        self._latency_s: float | None = None  # answers from a member's cache
        self._fetch_latency_s: float | None = None  # answers a member fetched from the origin
        self._origin_latency_s: float | None = None  # this mount's own origin reads
        self._last_logged: dict[str, float] = {}

    def deadline(self) -> float:
        """Seconds a member may take to answer from its cache: the floor, or `LATENCY_FACTOR`
        times the recent latency of such answers, plus the chunk's transfer time."""
        with self._lock:
            recent = self._latency_s or 0.0
        return max(self.deadline_floor_s, LATENCY_FACTOR * recent) + \
            self.chunk_size / self.min_rate

    def fetch_deadline(self) -> float:
        """Seconds an owner may take to fetch a chunk from the origin for us: at least
        `FETCH_FLOOR_S`, or `LATENCY_FACTOR` times the recent time of such fetches or of this
        mount's own origin reads (an owner fetching from a busy origin is as slow as we would
        be), never more than the mount's own origin timeout."""
        with self._lock:
            recent = max(self._fetch_latency_s or 0.0, self._origin_latency_s or 0.0)
        wait = max(FETCH_FLOOR_S, LATENCY_FACTOR * recent) + self.chunk_size / self.min_rate
        return min(wait, self.origin_timeout)

    def observe_origin(self, seconds: float) -> None:
        """The time one of this mount's own origin reads took (part of `fetch_deadline`)."""
        with self._lock:
            self._origin_latency_s = _ewma(self._origin_latency_s, seconds)

    def get(self, key: str) -> bytes | None:
        """The verified chunk `key` (``chunks/xx/<hash>``) from its owner or the next member;
        None if no member could serve it in time (the caller goes to the origin)."""
        kind, _, rest = key.partition("/")
        if kind != "chunks":
            return None
        name = rest.rpartition("/")[2]
        for member in ring.rank(self.membership.live(), name)[: self.max_members]:
            outcome = self._ask(member, name)
            if isinstance(outcome, bytes):
                return outcome
            if outcome == "stop":
                break
        with self._lock:
            self._stats.misses += 1
        return None

    def _ask(self, member: str, name: str) -> bytes | str:
        """The chunk from `member`, or what to do next: "next" member or "stop" (go to the
        origin).

        Two calls when the member does not hold it: first from its cache only, with the short
        `deadline` (a member that does not answer that in time is slow or gone: we hedge), then
        asking it to fetch from the origin, with `fetch_deadline` (its origin read takes as
        long as ours would; past it we hedge too, but the member answered, so it stays)."""
        client = self.membership.client(member)
        started = time.monotonic()
        fetched = False
        try:
            data, _ = client.get_chunk(self.remote, self.dataset, name, self.deadline(),
                                       cached_only=True)
        except PeerCallError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                return self._failed(member, name, e)
            self.membership.report_ok(member)
            started = time.monotonic()
            fetched = True
            try:
                data, _ = client.get_chunk(self.remote, self.dataset, name,
                                           self.fetch_deadline())
            except PeerCallError as e:
                return self._failed(member, name, e, answered=True)
        elapsed = time.monotonic() - started
        self.membership.report_ok(member)
        if hash_bytes(data) != name:
            with self._lock:
                self._stats.corrupt += 1
                self._stats.errors += 1
            self.membership.quarantine(
                member, f"chunk {name}: {len(data)} bytes that do not match its name")
            return "next"
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes += len(data)
            if fetched:
                self._fetch_latency_s = _ewma(self._fetch_latency_s, elapsed)
            else:
                self._latency_s = _ewma(self._latency_s, elapsed)
        return data

    def _failed(self, member: str, name: str, e: PeerCallError, answered: bool = False) -> str:
        """What to do after a failed call; `answered`: the member answered a first call for
        this chunk (a fetch that takes too long is the origin's slowness, not the member's)."""
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            with self._lock:
                self._stats.timeouts += 1
                self._stats.hedged += 1
            if not answered:
                self.membership.report_missed_deadline(member)
            self._log("timeout", "peer %s did not deliver chunk %s in time: reading it from "
                      "the origin", member, name)
            return "stop"
        if e.code == grpc.StatusCode.NOT_FOUND:  # the owner's origin lacks it: so would ours
            self.membership.report_ok(member)
            return "stop"
        with self._lock:
            self._stats.errors += 1
        if e.code == grpc.StatusCode.UNAVAILABLE:
            self.membership.report_unreachable(member, e)
        else:
            self._log(e.code.name, "peer %s refused or failed: %s", member, e)
        return "next"

    def _log(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last_logged.get(kind)
            loud = last is None or now - last >= LOG_INTERVAL_S
            if loud:
                self._last_logged[kind] = now
        log.log(logging.WARNING if loud else logging.DEBUG, message, *args)

    # -- the rest of the CacheTier protocol -----------------------------------------------------
    def get_range(self, key: str, offset: int, length: int) -> bytes | memoryview | None:
        """A range of the chunk: members serve whole chunks (verified against their names)."""
        data = self.get(key)
        return None if data is None else memoryview(data)[offset : offset + length]

    def put(self, key: str, data: bytes) -> None:
        """Nothing: a member fills its own cache (the owner when it fetches from the origin)."""

    def contains(self, key: str) -> bool:
        """False: whether a member holds a chunk is learnt by asking for it (`get`), not ahead."""
        return False

    def stats(self) -> TierStats:
        with self._lock:
            s = PeerStats(**vars(self._stats))
        return TierStats(hits=s.hits, misses=s.misses, hit_bytes=s.bytes, errors=s.errors,
                         corrupt=s.corrupt)

    def peer_stats(self) -> dict[str, int]:
        """The mount's `peer_*` counters (`cachefs stats`)."""
        with self._lock:
            s = PeerStats(**vars(self._stats))
        values = (s.hits, s.bytes, s.errors, s.timeouts, s.hedged, s.corrupt, s.misses,
                  len(self.membership.quarantined()), len(self.membership.live()))
        return dict(zip(PEER_KEYS, values, strict=True))

    def close(self) -> None:
        self.membership.close()


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else \
        (1 - LATENCY_WEIGHT) * previous + LATENCY_WEIGHT * sample
