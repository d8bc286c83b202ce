"""Test helper: a tiny authoritative DNS server on 127.0.0.1 whose records a test sets (dnslib).

    with DnsServer() as dns:
        dns.set("peers.test", ["192.0.2.1", "2001:db8::1"])   # A and AAAA records
        dns.failing = True                                    # every answer SERVFAIL
        dns.nameserver                                        # "127.0.0.1:PORT"

A name never set answers NXDOMAIN. It serves UDP from a thread of the test process and stops
(socket closed, thread joined) when the block ends, whatever happened.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, Self

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.servers import LOOPBACK, free_port

QUIET = DNSLogger("-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: DnsServer) -> None:
        self.owner = owner

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        self.owner.queries += 1
        if self.owner.failing:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        with self.owner.lock:
            addresses = self.owner.records.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        qtype = QTYPE[request.q.qtype]
        for address in addresses:
            if qtype == "A" and ":" not in address:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=1))
            elif qtype == "AAAA" and ":" in address:
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=1))
        return reply


class DnsServer:
    """See the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[str]] = {}
        self.failing = False
        self.queries = 0
        self.port = free_port()
        self.nameserver = f"{LOOPBACK}:{self.port}"
        self._server = DNSServer(_Zone(self), port=self.port, address=LOOPBACK, logger=QUIET)

    def set(self, name: str, addresses: list[str]) -> None:
        with self.lock:
            self.records[name.rstrip(".").lower()] = list(addresses)

    def start(self) -> Self:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()
        if self._server.thread is not None:
            self._server.thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
