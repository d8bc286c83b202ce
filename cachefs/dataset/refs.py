"""Branches and tags with compare-and-swap, built on put-if-absent generation objects.

Object stores offer one conditional write everywhere (S3 and Ceph `If-None-Match: *`, OSS
`x-oss-forbid-overwrite`, O_EXCL/link on files): create-if-absent. So a ref is a sequence of
numbered generation objects, `refs/DATASET/heads/NAME/00000000000000000042`, each holding the
commit it points to (or a deletion marker) plus who moved it, when and from what. The current
value is the highest generation. Moving a ref from generation g writes g+1 with put-if-absent:
of several racing writers exactly one creates it; the others get RefConflict and nothing changes.
A create told "already exists" reads the generation back first: SDKs resend a request whose reply
was lost, and the resent create finds the object its first try made. Every generation carries a
random `attempt` id, so finding exactly our bytes proves the update is ours and it succeeds.
After a create succeeds the writer checks that no higher generation appeared that does not build
on its own (so pruning old generations can never resurrect a stale update). The sequence doubles
as the reflog. A store that can refuse the create itself when a higher generation exists
(`put_if_latest`, the haystack:// remote's raft directory) does it in that one call instead.

Before a ref moves, every guard registered for the remote object (`add_ref_guard`) is checked: a
writer's repository lock registers one that refuses the move once the lock may have expired.

Before the first ref update through a store, it is probed: a scratch key is created twice, and a
store whose second create also succeeds ignores put-if-absent; ref updates are then refused
rather than risking a silently lost commit.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from cachefs.errors import (
    CorruptObject,
    InvalidName,
    ObjectNotFound,
    RefConflict,
    RemoteError,
    RemoteUnsupported,
)
from cachefs.names import check_hash, check_name
from cachefs.remotes.base import ObjectInfo, Remote

log = logging.getLogger("cachefs.refs")

RefKind = Literal["heads", "tags"]
KINDS: tuple[RefKind, ...] = ("heads", "tags")
_GEN_DIGITS = 20


@dataclass(frozen=True)
class RefValue:
    """A ref as read: the commit it points to (None: absent or deleted) and its generation."""

    commit: str | None
    generation: int


class RefAddress(NamedTuple):
    dataset: str
    kind: RefKind
    name: str


@dataclass(frozen=True)
class RefLogEntry:
    generation: int
    commit: str | None
    previous: str | None
    who: str
    time_ns: int
    reason: str


class RefStore(Protocol):
    """Where a remote keeps refs; object stores use GenerationRefStore, haystack its master."""

    def read(self, dataset: str, kind: RefKind, name: str) -> RefValue: ...

    def compare_and_swap(
        self, dataset: str, kind: RefKind, name: str, expected: RefValue,
        commit: str | None, reason: str,
    ) -> RefValue: ...

    def list(self, dataset: str, kind: RefKind) -> dict[str, str]: ...

    def history(self, dataset: str, kind: RefKind, name: str) -> list[RefLogEntry]: ...


RefGuard = Callable[[], None]  # raises (a CachefsError) to stop a ref move

# Guards per remote object (by identity: a lock and the refs it protects share one object).
# A module-level table because the ref layer must not depend on locks.py (it imports us).
_guards: dict[int, list[RefGuard]] = {}
_guards_lock = threading.Lock()


def add_ref_guard(remote: Remote, guard: RefGuard) -> None:
    """Run `guard()` before every ref move through `remote` until `remove_ref_guard`."""
    with _guards_lock:
        _guards.setdefault(id(remote), []).append(guard)


def remove_ref_guard(remote: Remote, guard: RefGuard) -> None:
    with _guards_lock:
        guards = _guards.get(id(remote), [])
        if guard in guards:
            guards.remove(guard)
        if not guards:
            _guards.pop(id(remote), None)


def check_ref_guards(remote: Remote) -> None:
    """Raise what a registered guard raises: the ref must not move."""
    with _guards_lock:
        guards = list(_guards.get(id(remote), ()))
    for guard in guards:
        guard()


@functools.cache  # a passwd lookup per ref update cost ~70 us (a file read each time)
def who_am_i() -> str:
    """`user@host` of this process, for reflogs and lock holders."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class GenerationRefStore:
    """RefStore over any Remote, using only put-if-absent."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self._probed = False

    @staticmethod
    def _prefix(dataset: str, kind: RefKind, name: str | None = None) -> str:
        check_name(dataset, "dataset name", existing=True)
        base = f"refs/{dataset}/{kind}/"
        return base if name is None else base + check_name(name, "ref name", existing=True) + "/"

    def _generations(self, dataset: str, kind: RefKind, name: str) -> list[int]:
        prefix = self._prefix(dataset, kind, name)
        gens = []
        for key in self.remote.list(prefix):
            tail = key[len(prefix) :]
            if len(tail) == _GEN_DIGITS and tail.isdigit():
                gens.append(int(tail))
        return sorted(gens)

    def _load(self, dataset: str, kind: RefKind, name: str, gen: int) -> RefLogEntry:
        key = self._prefix(dataset, kind, name) + f"{gen:0{_GEN_DIGITS}d}"
        raw = self.remote.get(key)
        try:
            doc = json.loads(raw)
            commit = doc["commit"]
            previous = doc.get("previous")
            for h in (commit, previous):
                if h is not None:
                    check_hash(h)
            return RefLogEntry(gen, commit, previous, str(doc.get("who", "")),
                               int(doc.get("time_ns", 0)), str(doc.get("reason", "")))
        except (ValueError, KeyError, TypeError, InvalidName) as e:
            raise CorruptObject(f"ref object {key} is corrupt: {e}", key) from e

    def read(self, dataset: str, kind: RefKind, name: str) -> RefValue:
        gens = self._generations(dataset, kind, name)
        if not gens:
            return RefValue(None, 0)
        return RefValue(self._load(dataset, kind, name, gens[-1]).commit, gens[-1])

    def probe(self) -> None:
        """Refuse stores that silently ignore put-if-absent (checked once per store)."""
        if self._probed:
            return
        key = f"probe/{secrets.token_hex(8)}"
        ours = secrets.token_hex(8).encode()
        try:
            # A first create whose reply was lost and retried reads "exists": it is still ours.
            first = self._create_or_find(key, ours)
            second = self.remote.put_if_absent(key, b"second")
        finally:
            self.remote.delete(key)
        if not first or second:
            mechanism = getattr(self.remote, "conditional_write", "exclusive create")
            raise RemoteUnsupported(
                f"{self.remote.url} ignores put-if-absent ({mechanism}): a second exclusive "
                "create of the same key succeeded, so concurrent ref updates could silently "
                "lose commits; ref updates on this store are refused"
            )
        self._probed = True

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether `key` holds exactly `data` (absent: False)."""
        try:
            return self.remote.get(key) == data
        except ObjectNotFound:
            return False

    def _create_or_find(self, key: str, data: bytes, prefix: str | None = None) -> bool:
        """Create `key` if absent (with `prefix`: only as the newest under it, where the store
        can say so); True also when the key already holds exactly `data`.

        SDKs resend a request whose reply was lost, and the resent create then finds the object
        its first try made: "already exists", although this attempt won. `data` is unique per
        attempt (a random id in it), so finding it stored proves the create was ours."""
        create_latest = getattr(self.remote, "put_if_latest", None)
        try:
            if prefix is not None and create_latest is not None:
                created = create_latest(key, data, prefix)
            else:
                created = self.remote.put_if_absent(key, data)
        except RemoteError:
            # The reply was lost and not retried (oss2 does not resend after a cut connection):
            # the create may have happened. If it did, it is ours; if not, the error stands.
            if self._holds(key, data):
                log.info("the create of %s was ours (its reply was lost)", key)
                return True
            raise
        if created:
            return True
        if self._holds(key, data):
            log.info("the create of %s was ours (its reply was lost and the retry found it)",
                     key)
            return True
        return False

    def compare_and_swap(
        self, dataset: str, kind: RefKind, name: str, expected: RefValue,
        commit: str | None, reason: str,
    ) -> RefValue:
        if commit is not None:
            check_hash(commit, "commit")
            if expected.commit is None:  # creating it: a new name follows git's rules
                check_name(name, "branch name" if kind == "heads" else "tag name")
        prefix = self._prefix(dataset, kind, name)  # validates the names before any write
        self.probe()
        gen = expected.generation + 1
        doc = {
            "commit": commit,
            "previous": expected.commit,
            "who": who_am_i(),
            "time_ns": time.time_ns(),
            "reason": reason,
            "attempt": secrets.token_hex(8),  # makes our bytes ours alone (_create_or_find)
        }
        key = prefix + f"{gen:0{_GEN_DIGITS}d}"
        check_ref_guards(self.remote)  # last thing before the move: a lock expired meanwhile?
        atomic = getattr(self.remote, "put_if_latest", None) is not None
        if not self._create_or_find(key, json.dumps(doc).encode(), prefix):
            current = self.read(dataset, kind, name)
            raise RefConflict(
                f"{'branch' if kind == 'heads' else 'tag'} {name!r} of {dataset!r} moved "
                f"concurrently (now at {(current.commit or 'deleted')[:12]}); nothing was "
                "changed, retry the command"
            )
        # A store that refuses a stale create itself (put_if_latest) already checked this.
        later = [] if atomic else \
            [g for g in self._generations(dataset, kind, name) if g > gen]
        if later and self._load(dataset, kind, name, later[0]).previous != commit:
            raise RefConflict(
                f"ref {kind}/{name} of {dataset!r}: update at generation {gen} was superseded "
                "by a writer that did not see it; retry the command"
            )
        log.debug("ref %s/%s/%s -> %s (generation %d)", dataset, kind, name, commit, gen)
        return RefValue(commit, gen)

    def list(self, dataset: str, kind: RefKind) -> dict[str, str]:
        prefix = self._prefix(dataset, kind)
        latest: dict[str, int] = {}
        for key in self.remote.list(prefix):
            name, _, tail = key[len(prefix) :].partition("/")
            if len(tail) == _GEN_DIGITS and tail.isdigit():
                latest[name] = max(latest.get(name, 0), int(tail))
        refs = {}
        for name, gen in sorted(latest.items()):
            commit = self._load(dataset, kind, name, gen).commit
            if commit is not None:
                refs[name] = commit
        return refs

    def history(self, dataset: str, kind: RefKind, name: str) -> list[RefLogEntry]:
        return [self._load(dataset, kind, name, g)
                for g in reversed(self._generations(dataset, kind, name))]

    def all_generations(self) -> Iterator[tuple[RefAddress, int, ObjectInfo]]:
        """Every generation object of every ref of every dataset (for gc), in key order."""
        for info in self.remote.list_info("refs/"):
            parts = info.key.split("/")
            if (len(parts) == 5 and parts[2] in KINDS and len(parts[4]) == _GEN_DIGITS
                    and parts[4].isdigit()):
                address = RefAddress(parts[1], parts[2], parts[3])  # type: ignore[arg-type]
                yield address, int(parts[4]), info

    def load(self, address: RefAddress, generation: int) -> RefLogEntry:
        return self._load(address.dataset, address.kind, address.name, generation)

    def delete_generation(self, address: RefAddress, generation: int) -> None:
        """Drop one old generation (gc). Never the newest: that one is the ref's value."""
        self.remote.delete(self._prefix(address.dataset, address.kind, address.name)
                           + f"{generation:0{_GEN_DIGITS}d}")
