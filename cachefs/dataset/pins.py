"""Pins: named roots beside refs that keep a version's objects from gc while readers use it.

A pin is the object `pins/NAME` in the repository, a small JSON document: the dataset, the commit
it keeps, who holds it (a node and process, or a CSI volume id), when it was created, and an
optional lease (`ttl_s`). gc keeps everything a live pin reaches, exactly as it keeps what refs
reach. A pin without a lease lives until removed (`cachefs pin rm`, DeleteVolume). A leased pin
(what a mount holds) lives while its holder rewrites it: it is expired once its object was not
rewritten for `ttl_s` seconds, judged from the object's modification time as the store lists it
(the store's clock, as lock staleness is in locks.py), never from a time the writer put inside.
So a crashed node's pins expire on their own, and gc prunes them once expired for its grace
period.

Why creation takes a writer lock. A mount resolves its ref first and pins the commit after; in
between, the branch may be deleted and gc may run. gc reads pins in both marking passes, the
second under the gc lock, so a pin stored before gc takes that lock is honoured. A pin stored
after gc read the pins in that second pass, while it deletes, would not be: its commit could be
deleted under it. So the pin is created holding a writer lock (locks.py), which cannot be held
while gc's sweep runs: either the pin is stored before gc locks (and its second pass sees it),
or gc's sweep is over before the pin exists. In the second case the commit may already be gone,
so the creator checks, still under the lock, that the commit is stored, and fails (removing its
pin) when it is not. A stored commit's closure is complete (gc deletes commits before the trees
and chunks below them), so a pinned commit that exists is whole.

Renewal rewrites the object in place (a new mtime), which every store does atomically: the pin
is listed before, during and after the rewrite, so gc running during a renewal always sees it.
Renewing needs no lock. A holder whose last successful rewrite is older than half the lease
(`FRESH_FRACTION`, the other half absorbing clock skew between machines, as for locks) treats
the pin as lapsed: gc may have expired it and deleted the commit meanwhile, so it pins again the
way creation does (lock, store, check the commit), rather than quietly reviving a pin whose data
may be gone. A pin found removed while still fresh was removed on purpose (`cachefs pin rm`): the
holder stops renewing it and never re-creates it (PinLost).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachefs.dataset.locks import FRESH_FRACTION, RepositoryLock
from cachefs.dataset.refs import who_am_i
from cachefs.dataset.repo import commit_key
from cachefs.errors import (
    AlreadyExists,
    CachefsError,
    CorruptObject,
    InvalidName,
    ObjectNotFound,
    UsageError,
)
from cachefs.names import check_hash, check_name
from cachefs.remotes.base import ObjectInfo, Remote

log = logging.getLogger("cachefs.pins")

PIN_PREFIX = "pins/"
# A mount's lease: rewritten every minute, expired after ten minutes without a rewrite (nine
# missed renewals: a store outage of several minutes does not drop the pin; a dead node's pin
# stops protecting its version ten minutes after the node died).
DEFAULT_LEASE_S = 600.0
DEFAULT_RENEW_S = 60.0
# How long pin creation waits for a running gc sweep to end (writers wait for it the same way).
DEFAULT_LOCK_WAIT_S = 600.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class PinLost(CachefsError):
    """A leased pin was removed by someone else while it was fresh: it is not re-created."""


@dataclass(frozen=True)
class Pin:
    """One pin as stored and listed: `renewed_ns` is its object's mtime by the store's clock."""

    name: str
    dataset: str
    commit: str
    holder: str
    created_ns: int
    ttl_s: float | None
    renewed_ns: int

    @property
    def expires_ns(self) -> int | None:
        return None if self.ttl_s is None else self.renewed_ns + int(self.ttl_s * 1e9)

    def expired(self, now_ns: int | None = None) -> bool:
        expires = self.expires_ns
        return expires is not None and (now_ns or time.time_ns()) > expires

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dataset": self.dataset, "commit": self.commit,
                "holder": self.holder, "created_ns": self.created_ns, "ttl_s": self.ttl_s,
                "renewed_ns": self.renewed_ns, "expires_ns": self.expires_ns,
                "expired": self.expired()}


def pin_key(name: str, existing: bool = True) -> str:
    """The key of pin `name`; `existing`: only the character rule (reading, removing)."""
    return PIN_PREFIX + check_name(name, "pin name", existing=existing)


def safe_name_part(text: str, limit: int = 40) -> str:
    """`text` reduced to characters a pin name may hold (for generated names)."""
    return _UNSAFE.sub("-", text).strip("-._")[:limit] or "x"


def generated_name(prefix: str) -> str:
    """A fresh pin name starting with `prefix` (already valid characters)."""
    return check_name(f"{prefix[:100]}-{secrets.token_hex(4)}", "pin name")


def _document(dataset: str, commit: str, holder: str, ttl_s: float | None,
              created_ns: int | None = None) -> bytes:
    return json.dumps({"dataset": dataset, "commit": commit, "holder": holder,
                       "created_ns": created_ns or time.time_ns(), "ttl_s": ttl_s}).encode()


class PinStore:
    """The pins of one repository (a Remote)."""

    def __init__(self, remote: Remote, lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
                 lock_factory: Callable[[], RepositoryLock] | None = None) -> None:
        self.remote = remote
        self.lock_factory = lock_factory or (
            lambda: RepositoryLock(remote, "writer", wait_s=lock_wait_s))

    # -- reading ----------------------------------------------------------------------------
    def _parse(self, info: ObjectInfo) -> Pin:
        name = info.key[len(PIN_PREFIX):]
        raw = self.remote.get(info.key)
        try:
            doc = json.loads(raw)
            ttl = doc.get("ttl_s")
            return Pin(check_name(name, "pin name", existing=True),
                       check_name(str(doc["dataset"]), "dataset", existing=True),
                       check_hash(str(doc["commit"]), "commit"), str(doc.get("holder", "")),
                       int(doc.get("created_ns", 0)), None if ttl is None else float(ttl),
                       info.mtime_ns)
        except (ValueError, KeyError, TypeError, InvalidName) as e:
            raise CorruptObject(f"pin {info.key} is corrupt ({e}); what it keeps cannot be "
                                f"known: remove it with `cachefs pin rm {name}`", info.key) from e

    def list(self) -> list[Pin]:
        """Every pin, live or expired, by name (one removed while listing is left out)."""
        pins = []
        for info in self.remote.list_info(PIN_PREFIX):
            if "/" in info.key[len(PIN_PREFIX):]:
                continue  # not a pin this version writes
            try:
                pins.append(self._parse(info))
            except ObjectNotFound:
                continue  # removed since the listing
        return pins

    def live(self, now_ns: int | None = None) -> list[Pin]:
        """The pins that keep their commit now (gc's roots beside refs)."""
        now = now_ns or time.time_ns()
        return [pin for pin in self.list() if not pin.expired(now)]

    def get(self, name: str) -> Pin:
        key = pin_key(name)
        for info in self.remote.list_info(key):
            if info.key == key:
                return self._parse(info)
        raise ObjectNotFound(f"no pin {name!r} in {self.remote.url}")

    # -- writing ----------------------------------------------------------------------------
    def add(self, dataset: str, commit: str, name: str | None = None,
            ttl_s: float | None = None, holder: str | None = None,
            created_ns: int | None = None) -> Pin:
        """Pin `commit` of `dataset` under `name` (generated when None); AlreadyExists if that
        name pins something else. Locked and checked as the module docstring explains:
        ObjectNotFound (and no pin) if gc removed the commit before it could be pinned."""
        check_name(dataset, "dataset name", existing=True)
        check_hash(commit, "commit")
        if ttl_s is not None and ttl_s <= 0:
            raise UsageError("a pin's lease must be positive")
        name = name if name is not None else generated_name(
            f"{safe_name_part(dataset, 80)}-{commit[:12]}")
        key = pin_key(name, existing=False)
        data = _document(dataset, commit, holder or f"{who_am_i()} cachefs pin", ttl_s,
                         created_ns)
        with self.lock_factory():
            if not self.remote.put_if_absent(key, data):
                existing = self.get(name)
                if (existing.dataset, existing.commit) != (dataset, commit):
                    raise AlreadyExists(f"pin {name!r} already exists in {self.remote.url} "
                                        f"(it keeps {existing.dataset}@{existing.commit[:12]})")
                self.remote.put(key, data)  # the same pin again (a retried request): renewed
            try:
                self.remote.get(commit_key(commit), 0, 1)
            except ObjectNotFound:
                self.remote.delete(key)
                raise ObjectNotFound(
                    f"commit {commit[:12]} of {dataset!r} is no longer stored in "
                    f"{self.remote.url} (gc removed it); pin a current version") from None
        self.remote.flush()  # a pin is a root: durable like a ref move
        return self.get(name)

    def renew(self, name: str, data: bytes) -> None:
        """Rewrite pin `name` with `data` (a new mtime); PinLost if it was removed."""
        key = pin_key(name)
        if not self.remote.has([key]):
            raise PinLost(f"pin {name!r} was removed from {self.remote.url}; not re-created")
        self.remote.put(key, data)
        self.remote.flush()

    def remove(self, name: str) -> bool:
        """Remove pin `name`; False if there was none (removing is idempotent)."""
        key = pin_key(name)
        existed = bool(self.remote.has([key]))
        self.remote.delete(key)
        return existed

    def prune_expired(self, older_than_s: float, now_ns: int | None = None) -> list[str]:
        """Remove pins expired for more than `older_than_s` seconds (gc, under its lock)."""
        now = now_ns or time.time_ns()
        pruned = []
        for pin in self.list():
            expires = pin.expires_ns
            if expires is not None and now - expires > older_than_s * 1e9:
                self.remote.delete(PIN_PREFIX + pin.name)
                log.info("removed pin %s (expired; held by %s)", pin.name, pin.holder)
                pruned.append(pin.name)
        return pruned


class LeasedPin:
    """One pin held with a lease: `create`, then `renew` every `renew_s`, `release` at the end.

    Blocking calls (run them on a worker thread); `release` may be called while `create` still
    runs on another thread, and then the pin is removed as soon as it exists.
    """

    def __init__(self, store: PinStore, dataset: str, commit: str, holder: str,
                 name: str | None = None, ttl_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.dataset = dataset
        self.commit = commit
        self.holder = holder
        self.name = name or generated_name(f"mount-{safe_name_part(holder)}")
        self.ttl_s = ttl_s
        self.created_ns = time.time_ns()
        self._mutex = threading.Lock()
        self._created = False
        self._released = False
        self._written_at: float | None = None  # monotonic start of the last successful write

    @property
    def fresh(self) -> bool:
        """Whether the last write is recent enough that no gc can have expired the pin."""
        written = self._written_at
        return written is not None and \
            time.monotonic() - written < self.ttl_s * FRESH_FRACTION

    def create(self) -> None:
        started = time.monotonic()
        self.store.add(self.dataset, self.commit, self.name, self.ttl_s, self.holder,
                       self.created_ns)
        with self._mutex:
            self._created = True
            self._written_at = started
            released = self._released
        if released:  # release() ran meanwhile and found nothing to remove yet
            self.store.remove(self.name)

    def renew(self) -> None:
        """Rewrite the pin; pin again (checked) if it lapsed; PinLost if it was removed."""
        if self._released:
            return
        if not self.fresh:
            log.warning("pin %s was not renewed for over %.0f s: pinning %s again", self.name,
                        self.ttl_s * FRESH_FRACTION, self.commit[:12])
            self.create()
            return
        started = time.monotonic()
        self.store.renew(self.name, _document(self.dataset, self.commit, self.holder,
                                              self.ttl_s, self.created_ns))
        self._written_at = started
        if self._released:  # released while this rewrite ran (an abandoned worker thread)
            self.store.remove(self.name)

    def release(self) -> None:
        with self._mutex:
            self._released = True
            created = self._created
        if created:
            self.store.remove(self.name)
