"""Where the peer ring's members come from: `MemberSource`s, and the `--cache-peers` syntax.

`--cache-peers` (of `cachefs mount` and `cachefs peer status`) is a comma-separated list whose
items are any of:

    HOST:PORT                 a member, as it advertises itself ([ADDR]:PORT for IPv6)
    file:PATH                 the members listed in a file (as --cache-peers-file): comma, space
                              or line separated, `#` comments; re-read when its mtime or size
                              changes (checked every second)
    dns:NAME:PORT             the A and AAAA records of NAME (a Kubernetes headless Service),
                              each address a member ADDR:PORT; re-resolved every 10 s through
                              the system's resolver (`socket.getaddrinfo`: /etc/hosts,
                              resolv.conf and its search domains)
    master:REMOTE             the live nodes of the node registry of the haystack cluster behind
                              the configured remote REMOTE (a name from the config, never a
                              URL; its masters and token as the remote uses them), each node's
                              registered peer address; re-listed every 2 s

Options follow a `?`, `&`-separated: `refresh=SECONDS` (dns:, master:), `nameserver=IP[:PORT]`
(dns: ask that server directly, with dnspython, instead of the system's resolver) and
`serving=DATASET@COMMIT` (master: only the nodes registered as serving that version: a
job-scoped ring, what `cachefs mount --peer-scope dataset` writes). An item whose part after
`dns:`, `file:` or `master:` is only digits is a member (a host of that name and a port).

A source's `resolve` does the I/O and raises on failure; `Membership`
(`cachefs/peer/members.py`) calls it at start (a failure then is a UsageError) and then every
`refresh_s` seconds from its prober thread, keeping a failed source's previous members.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
from typing import Protocol
from urllib.parse import parse_qsl

from cachefs.errors import CachefsError, ConfigError, RemoteError, UsageError
from cachefs.peer.ring import parse_member, parse_members

log = logging.getLogger("cachefs.peer.sources")

FILE_REFRESH_S = 1.0
DNS_REFRESH_S = 10.0
MASTER_REFRESH_S = 2.0
DNS_TIMEOUT_S = 3.0     # one resolution through a given nameserver
MASTER_TIMEOUT_S = 3.0  # one ListNodes, retries across the masters included
MIN_REFRESH_S = 0.1
KINDS = ("dns", "file", "master")
OPTIONS = {"dns": {"refresh", "nameserver"}, "master": {"refresh", "serving"}, "file": set()}
DNS_NAME_RE = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                         r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")
REMOTE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SERVING_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}@[0-9a-f]{64}")
SYNTAX = ("HOST:PORT, dns:NAME:PORT, file:PATH or master:REMOTE (options after '?': "
          "refresh=S, nameserver=IP[:PORT] for dns:, serving=DATASET@COMMIT for master:)")


class MemberSource(Protocol):
    """One origin of ring members."""

    refresh_s: float  # how often `resolve` is asked again (math.inf: never)

    def resolve(self) -> list[str]:
        """The members now (HOST:PORT, as `cachefs.peer.ring.parse_member` writes them);
        raises (a CachefsError, OSError...) when they cannot be learnt."""
        ...

    def describe(self) -> str:
        """What it is, for logs and status documents, e.g. "dns:peers.cachefs.svc:7470"."""
        ...

    def close(self) -> None:
        ...


class StaticSource:
    """Members listed on the command line; never refreshed."""

    refresh_s = math.inf

    def __init__(self, members: list[str]) -> None:
        self.members = list(members)

    def resolve(self) -> list[str]:
        return list(self.members)

    def describe(self) -> str:
        return "static:" + ",".join(self.members)

    def close(self) -> None:
        pass


class FileSource:
    """A file of members, re-read when its modification time or size changes."""

    def __init__(self, path: str, refresh_s: float = FILE_REFRESH_S) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._stamp: tuple[int, int] | None = None
        self._members: list[str] = []

    def resolve(self) -> list[str]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return list(self._members)
            with open(self.path) as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"cannot read it: {e.strerror or e}") from e
        self._members = parse_members(text, f"peer in {self.path}")
        self._stamp = stamp
        return list(self._members)

    def describe(self) -> str:
        return f"file:{self.path}"

    def close(self) -> None:
        pass


def bracketed(address: str, port: int) -> str:
    """ADDR:PORT, an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class DnsSource:
    """The A and AAAA records of a name: through the system's resolver, or with `nameserver`
    (IP, port), by asking that server directly (dnspython)."""

    def __init__(self, name: str, port: int, refresh_s: float = DNS_REFRESH_S,
                 nameserver: tuple[str, int] | None = None) -> None:
        self.name = name
        self.port = port
        self.refresh_s = refresh_s
        self.nameserver = nameserver

    def resolve(self) -> list[str]:
        addresses = self._ask_nameserver() if self.nameserver else self._ask_system()
        if not addresses:
            raise RemoteError(f"{self.name}: no A or AAAA record")
        return sorted({bracketed(a, self.port) for a in addresses})

    def _ask_system(self) -> list[str]:
        try:
            infos = socket.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise RemoteError(f"cannot resolve {self.name}: {e.strerror}") from e
        return [str(info[4][0]) for info in infos
                if info[0] in (socket.AF_INET, socket.AF_INET6)]

    def _ask_nameserver(self) -> list[str]:
        import dns.exception
        import dns.resolver

        assert self.nameserver is not None
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.nameserver[0]]
        resolver.port = self.nameserver[1]
        resolver.lifetime = DNS_TIMEOUT_S
        where = f"{self.name} at nameserver {bracketed(*self.nameserver)}"
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = resolver.resolve(self.name, rdtype, search=False)
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.NXDOMAIN as e:
                raise RemoteError(f"{where}: no such name") from e
            except dns.exception.DNSException as e:
                raise RemoteError(f"{where}: {e}") from e
            found += [record.to_text() for record in answer]
        return found

    def describe(self) -> str:
        text = f"dns:{self.name}:{self.port}"
        if self.nameserver is not None:
            text += f"?nameserver={bracketed(*self.nameserver)}"
        return text

    def close(self) -> None:
        pass


class MasterSource:
    """The live nodes of a haystack cluster's node registry (through the configured remote
    `remote`), optionally only those serving `serving` (DATASET@COMMIT)."""

    def __init__(self, remote: str, serving: str = "", refresh_s: float = MASTER_REFRESH_S,
                 url: str | None = None) -> None:
        from cachefs.remotes.haystack import NodeRegistry

        self.remote = remote
        self.serving = serving
        self.refresh_s = refresh_s
        if url is None:
            url = remote_url(remote)
        self.registry = NodeRegistry.from_url(url, timeout=MASTER_TIMEOUT_S)

    def resolve(self) -> list[str]:
        nodes = self.registry.list_nodes(self.serving)
        return sorted({parse_member(n.peer_address, f"node {n.name}'s peer address")
                       for n in nodes if n.peer_address})

    def describe(self) -> str:
        return f"master:{self.remote}" + (f"?serving={self.serving}" if self.serving else "")

    def close(self) -> None:
        self.registry.close()


def remote_url(remote: str) -> str:
    """The URL of configured remote `remote`, which must be a haystack cluster."""
    from cachefs.config import Config

    try:
        url = Config.load().url_of(remote)
    except CachefsError as e:
        raise ConfigError(f"master:{remote}: {e}") from e
    if not url.startswith("haystack://"):
        raise ConfigError(f"master:{remote}: remote {remote!r} is not a haystack cluster "
                          "(only a haystack:// remote has a node registry)")
    return url


# -- the syntax -----------------------------------------------------------------------------


def split_specs(text: str | list[str]) -> list[str]:
    """The items of a --cache-peers value (comma or whitespace separated), or of a list of
    values."""
    values = [text] if isinstance(text, str) else list(text)
    return [item for value in values for item in value.replace(",", " ").split()]


def parse_spec(item: str, what: str = "--cache-peers") -> str:
    """One item, checked (syntax only: nothing is read or asked) and written canonically:
    a member as `parse_member` writes it, a file: with an absolute path, options sorted."""
    kind, colon, rest = item.partition(":")
    if not colon or kind not in KINDS or rest.isdecimal():
        try:
            return parse_member(item, f"{what} member")
        except UsageError as e:
            raise UsageError(f"{e}; each item is {SYNTAX}") from None
    body, _, query = rest.partition("?") if kind != "file" else (rest, "", "")
    options = _options(kind, query, item, what)
    if kind == "file":
        if not body:
            raise UsageError(f"{what} {item!r}: file: needs a path, file:PATH")
        return f"file:{os.path.abspath(body)}"
    if kind == "dns":
        name, sep, port = body.rpartition(":")
        if not sep or not DNS_NAME_RE.fullmatch(name) or not _is_port(port):
            raise UsageError(f"{what} {item!r}: expected dns:NAME:PORT, e.g. "
                             "dns:peers.cachefs.svc.cluster.local:7470")
        body = f"{name}:{int(port)}"
        if "nameserver" in options:
            options["nameserver"] = bracketed(*_nameserver(options["nameserver"], item, what))
    else:
        if not REMOTE_RE.fullmatch(body):
            raise UsageError(f"{what} {item!r}: expected master:REMOTE, the name of a "
                             "configured haystack remote (not a URL)")
        if "serving" in options and not SERVING_RE.fullmatch(options["serving"]):
            raise UsageError(f"{what} {item!r}: serving= expects DATASET@COMMIT (the "
                             "commit's 64 hex digits)")
    suffix = "&".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{kind}:{body}" + (f"?{suffix}" if suffix else "")


def parse_specs(text: str | list[str], what: str = "--cache-peers") -> list[str]:
    """Every item of a --cache-peers value, checked and canonical, without duplicates."""
    return list(dict.fromkeys(parse_spec(item, what) for item in split_specs(text)))


def _options(kind: str, query: str, item: str, what: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UsageError(f"{what} {item!r}: options are NAME=VALUE&...") from None
    options = dict(pairs)
    unknown = sorted(set(options) - OPTIONS[kind])
    if unknown or len(options) != len(pairs):
        allowed = ", ".join(sorted(OPTIONS[kind])) or "none"
        raise UsageError(f"{what} {item!r}: unknown or repeated option "
                         f"{', '.join(unknown) or 'given twice'} (allowed for {kind}: "
                         f"{allowed})")
    if "refresh" in options:
        options["refresh"] = f"{_refresh(options['refresh'], item, what):g}"
    return options


def _is_port(text: str) -> bool:
    return text.isdecimal() and 0 < int(text) < 65536


def _refresh(text: str, item: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MIN_REFRESH_S <= value < math.inf:
        raise UsageError(f"{what} {item!r}: refresh= expects seconds, at least {MIN_REFRESH_S}")
    return value


def _nameserver(text: str, item: str, what: str) -> tuple[str, int]:
    """IP, [IPv6]:PORT or IPv4:PORT -> (ip, port); port 53 by default."""
    host, port = text, "53"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            host, port = text.strip("[]"), "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {item!r}: nameserver= expects an IP address[:PORT]") from None
    if not _is_port(port):
        raise UsageError(f"{what} {item!r}: nameserver port {port!r}")
    return host, int(port)


def _add_source(item: str, what: str, static: list[str], sources: list[MemberSource]) -> None:
    """One checked item: a member (to `static`) or a new source (to `sources`)."""
    kind, _, rest = item.partition(":")
    if kind not in KINDS or rest.isdecimal():
        static.append(item)
        return
    body, _, query = rest.partition("?") if kind != "file" else (rest, "", "")
    options = dict(parse_qsl(query))
    if kind == "file":
        sources.append(FileSource(body))
    elif kind == "dns":
        name, _, port = body.rpartition(":")
        nameserver = _nameserver(options["nameserver"], item, what) \
            if "nameserver" in options else None
        sources.append(DnsSource(name, int(port),
                                 float(options.get("refresh", DNS_REFRESH_S)), nameserver))
    else:
        sources.append(MasterSource(body, options.get("serving", ""),
                                    float(options.get("refresh", MASTER_REFRESH_S))))


def build_sources(specs: list[str], what: str = "--cache-peers") -> list[MemberSource]:
    """The sources of checked items (`parse_specs`): the members among them as one static
    source, then one source per other item. Configuration errors (a master: remote that is
    not a configured haystack remote) raise ConfigError; nothing is resolved yet."""
    static: list[str] = []
    sources: list[MemberSource] = []
    try:
        for item in parse_specs(specs, what):
            _add_source(item, what, static, sources)
    except BaseException:
        for source in sources:
            source.close()
        raise
    if static:
        sources.insert(0, StaticSource(static))
    return sources


def scoped(specs: list[str], dataset: str, commit: str) -> list[str]:
    """The items with every master: source narrowed to the nodes serving DATASET@COMMIT
    (`cachefs mount --peer-scope dataset`); UsageError without a master: source."""
    version = f"{dataset}@{commit}"
    out: list[str] = []
    narrowed = False
    for item in parse_specs(specs):
        if item.startswith("master:") and not item[7:].isdecimal():
            body, _, query = item.partition("?")
            options = {k: v for k, v in parse_qsl(query) if k != "serving"}
            options["serving"] = version
            item = parse_spec(f"{body}?" + "&".join(f"{k}={v}" for k, v in options.items()))
            narrowed = True
        out.append(item)
    if not narrowed:
        raise UsageError("--peer-scope dataset: needs a master:REMOTE source in --cache-peers "
                         "(only a haystack cluster's node registry knows which nodes serve "
                         "which version)")
    return out
