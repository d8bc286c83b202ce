"""Replica placement: which R storage servers hold each logical volume (pure functions, no I/O).

`place` takes the current replica sets and the servers that may hold replicas (registered, not
dead: a server that is only *down* keeps its replicas, repair catches it up when it returns)
and returns the new sets. It never moves a surviving replica: it only drops replicas on servers
that are gone (dead or unknown) and fills sets that are short, so the copying it causes is
exactly the repairs that have to happen anyway.

Filling a set picks, one replica at a time, the candidate with the smallest key
(zone already in the set, replicas the server holds so far, rotation), where the rotation
``(rank of the server id - vid) mod servers`` spreads ties over the servers instead of always
favouring the lowest id. So replicas go to distinct zones where possible, the load stays
balanced (every pick goes to a least-loaded server of a fresh zone), and the result depends only
on the arguments: every master computing it from the same replicated state gets the same sets.

Nothing is placed until at least R servers can hold replicas (a cluster being brought up does
not start under-replicated; the master also waits for registrations to pause, so a cluster
started server by server is spread over all of them); after that a set that cannot be filled
(too few servers left) keeps what it has and is filled as servers register.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def place(volumes: int, replicas: int, servers: Mapping[str, str],
          current: Sequence[Sequence[str]] = ()) -> list[list[str]]:
    """The replica set of every vid in ``range(volumes)``.

    `servers` maps each server that may hold replicas (id -> zone); `current` is the sets so
    far (missing or empty for a vid never placed). Replicas on servers not in `servers` are
    dropped, the others kept in order; short sets are filled to `replicas` where candidates
    remain."""
    if volumes < 0 or replicas < 1:
        raise ValueError(f"volumes {volumes}, replicas {replicas}: need volumes >= 0, "
                         "replicas >= 1")
    sets = [[sid for sid in (current[vid] if vid < len(current) else ()) if sid in servers]
            for vid in range(volumes)]
    # dedupe (a set never names a server twice), keeping the first
    sets = [list(dict.fromkeys(members)) for members in sets]
    if not any(sets) and len(servers) < replicas:
        return sets  # not placed yet: wait for R servers
    ids = sorted(servers)
    rank = {sid: i for i, sid in enumerate(ids)}
    load = dict.fromkeys(ids, 0)
    for members in sets:
        for sid in members:
            load[sid] += 1
    for vid, members in enumerate(sets):
        while len(members) < replicas:
            zones = {servers[sid] for sid in members}
            candidates = [sid for sid in ids if sid not in members]
            if not candidates:
                break
            best = min(candidates, key=lambda sid: (servers[sid] in zones, load[sid],
                                                    (rank[sid] - vid) % len(ids)))
            members.append(best)
            load[best] += 1
    return sets


def replace(sets: Sequence[Sequence[str]], gone: str, replicas: int,
            servers: Mapping[str, str]) -> list[list[str]]:
    """`sets` with server `gone` replaced wherever it was (by `place`'s rule); `servers` are
    the candidates, `gone` excluded whatever it says."""
    candidates = {sid: zone for sid, zone in servers.items() if sid != gone}
    return place(len(sets), replicas, candidates, sets)
