"""Which member owns a chunk: rendezvous (highest-random-weight) hashing over the live members.

Every node computes the same ranking from the same member list, with no tracker and no state:
a member's weight for a chunk is the first 8 bytes of BLAKE3(member address + NUL + chunk
name), and the members ranked by weight (highest first) are the chunk's owner, then the next
one to ask. When a member leaves, only the chunks it owned move (each to its own next-ranked
member); when one joins, it takes about 1/N of the chunks from the others. Pure code: the
addresses come from `cachefs/peer/members.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blake3 import blake3

from cachefs.errors import UsageError


def weight(member: str, chunk: str) -> int:
    """The member's weight for a chunk: a 64-bit number both sides compute alike."""
    digest = blake3(member.encode() + b"\0" + chunk.encode()).digest(length=8)
    return int.from_bytes(digest, "big")


def rank(members: Iterable[str], chunk: str) -> list[str]:
    """The members in the order to ask them for `chunk`: its owner first."""
    return sorted(members, key=lambda member: (weight(member, chunk), member), reverse=True)


def owner(members: Sequence[str], chunk: str) -> str | None:
    """The member that owns `chunk`, or None without members."""
    best: tuple[int, str] | None = None
    for member in members:
        key = (weight(member, chunk), member)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def shares(members: Sequence[str], chunks: Iterable[str]) -> dict[str, float]:
    """The fraction of `chunks` each member owns (for `cachefs peer status`)."""
    counts = dict.fromkeys(members, 0)
    total = 0
    for chunk in chunks:
        total += 1
        best = owner(members, chunk)
        if best is not None:
            counts[best] += 1
    return {member: (count / total if total else 0.0) for member, count in counts.items()}


def parse_member(text: str, what: str = "peer") -> str:
    """A member address as written in a peer list: HOST:PORT (an IPv6 host in brackets); the
    canonical form every node must use alike, since the address is the member's identity."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what} {text.strip()!r}: expected HOST:PORT")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise UsageError(f"{what} {text.strip()!r}: put an IPv6 address in brackets, [ADDR]:PORT")
    return f"{host}:{int(port)}"


def parse_members(text: str, what: str = "peer") -> list[str]:
    """A comma- or whitespace-separated list of members (a peers file may have # comments),
    without duplicates, in the order given."""
    members: list[str] = []
    for line in text.splitlines():
        line = line.partition("#")[0]
        for item in line.replace(",", " ").split():
            member = parse_member(item, what)
            if member not in members:
                members.append(member)
    return members
