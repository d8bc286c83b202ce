"""A loopback reverse proxy that loses or spoils chosen answers of a real object-store server.

`FaultProxy` sits in front of an HTTP endpoint (the moto S3 server, the OSS test server) and
forwards every request unchanged, Host header included, so signatures stay valid. A `Fault`
picks requests by method and path; for the first `times` of them the proxy still forwards the
request, so the server applies it, and then, instead of relaying the server's answer:

- ``LOST``: closes the client's connection without a byte, as a connection cut after the
  request went out (the SDK sees "connection closed" and may retry the request);
- an HTTP status (e.g. 504): answers it, as a gateway whose backend answered too late;
- a `rewrite` function: relays the answer with its body replaced (a malformed listing).

It also counts the bytes of the GET answers it relays and can pace every answer through one
shared link of a given speed (`rate`): an object store's egress, as the peer tier's tests and
`benchmarks.p2p` measure it.

Everything binds 127.0.0.1 and stops within a bounded time (tests.servers.LoopbackHTTPServer).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Self
from urllib.parse import unquote

from tests.servers import LOOPBACK, KeepAliveHandler, LoopbackHTTPServer, ServerContext

LOST = "lost"
UPSTREAM_TIMEOUT_S = 30.0
_PACING_PIECE = 64 << 10  # bytes sent per turn on a rate-limited link

# Headers that describe one hop, not the message: never forwarded as they are.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
               "transfer-encoding", "upgrade"}


@dataclass
class Fault:
    """What to do to the answers of requests `method` whose (unquoted) path contains
    `path_part`."""

    method: str
    path_part: str
    action: str | int | Callable[[bytes], bytes]  # LOST, a status, or a body rewrite
    times: int = 1  # how many matching requests get it; later ones pass unchanged
    hits: int = 0  # how many got it so far

    def matches(self, method: str, path: str) -> bool:
        return (method == self.method and self.path_part in unquote(path)  # oss2 quotes '/'
                and self.hits < self.times)


@dataclass
class _Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _Handler(KeepAliveHandler):
    server: _Server

    def _upstream(self, body: bytes) -> _Answer:
        conn = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                          timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            payload = response.read()
            return _Answer(response.status, response.reason, response.getheaders(), payload)
        finally:
            conn.close()

    def _relay(self, answer: _Answer) -> None:
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.server.rate is None:
            self.wfile.write(answer.body)
        else:
            view = memoryview(answer.body)
            for start in range(0, len(view), _PACING_PIECE):
                piece = view[start : start + _PACING_PIECE]
                self.server.pace(len(piece))
                self.wfile.write(piece)
        if self.command == "GET":
            self.server.count_get(len(answer.body))

    def _serve(self) -> None:
        body = self.read_body()
        answer = self._upstream(body)  # the server applies the request in every case
        fault = self.server.take_fault(self.command, self.path)
        if fault is None:
            self._relay(answer)
        elif fault.action == LOST:
            self.close_connection = True  # the socket closes with nothing sent
        elif isinstance(fault.action, int):
            self._relay(_Answer(fault.action, HTTPStatus(fault.action).phrase, [], b""))
        else:
            assert callable(fault.action)
            self._relay(_Answer(answer.status, answer.reason, answer.headers,
                                fault.action(answer.body)))

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _serve


class _Server(LoopbackHTTPServer):
    def __init__(self, upstream_host: str, upstream_port: int, faults: list[Fault],
                 rate: float | None = None) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.faults = faults
        self.rate = rate
        self.get_bytes = 0
        self.gets = 0
        self._faults_lock = threading.Lock()
        self._next_free = 0.0  # when the shared link is free again (time.monotonic)
        super().__init__(_Handler)

    def count_get(self, size: int) -> None:
        with self._faults_lock:
            self.gets += 1
            self.get_bytes += size

    def pace(self, size: int) -> None:
        """Wait for `size` bytes' turn on the link shared by every answer (`rate` bytes/s)."""
        assert self.rate is not None
        with self._faults_lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + size / self.rate
            done = self._next_free
        time.sleep(max(0.0, done - now))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._faults_lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None


class FaultProxy(ServerContext):
    """A reverse proxy on 127.0.0.1 to `upstream` (http://host:port) applying `faults`.

    It counts the GET answers it relays (`gets`, `get_bytes`: what an object store would bill
    as egress), and with `rate` (bytes/s) it sends every answer's body through one shared link
    of that speed, in 64 KiB pieces, as an object store's link that all clients share."""

    def __init__(self, upstream: str, *faults: Fault, rate: float | None = None) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.faults = list(faults)
        self._server = _Server(host, int(port or 80), self.faults, rate)
        self.port = int(self._server.server_address[1])

    @property
    def get_bytes(self) -> int:
        return self._server.get_bytes

    @property
    def gets(self) -> int:
        return self._server.gets

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        self._server.start(f"fault-proxy:{self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut open connections, join every thread; safe to call twice."""
        self._server.stop(timeout)
