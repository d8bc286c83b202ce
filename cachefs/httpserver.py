"""Small HTTP servers of cachefs: metrics, node inventory, scheduler extender.

- `parse_listen` reads a listen address option: HOST:PORT, [IPv6]:PORT, or :PORT for every
  interface; anything else is a `UsageError` naming the option.
- `ServiceHTTPServer` is a threading HTTP server on such an address (IPv4 or IPv6) that
  `start()` serves in a daemon thread and `stop()` ends, cutting the connections clients keep
  open (it tracks them), so a stop never waits on an idle keep-alive client.
- `BaseHandler` is its request handler base: HTTP/1.1 keep-alive, request lines logged through
  `logging` at debug level, `send_body`, `read_body` (plain or chunked, bounded) and
  `send_not_allowed` (405).

The test servers (tests/servers.py) build on the same two classes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from cachefs.errors import UsageError

log = logging.getLogger("cachefs.http")

TEXT_PLAIN = "text/plain; charset=utf-8"
DRAIN_LIMIT = 1 << 20  # a refused request's body up to this size is read to keep the connection


def parse_listen(text: str, option: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT, [IPv6]:PORT or :PORT (every interface, 0.0.0.0); `option`
    (e.g. ``--listen``) names the option in the UsageError for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} {text!r}: expected HOST:PORT, [IPv6]:PORT or :PORT, "
                         "e.g. 127.0.0.1:8888")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class ServiceHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that tracks its client connections; `start()` serves in a
    thread, `stop()` ends it and every open connection."""

    daemon_threads = True
    block_on_close = False
    thread_name = "cachefs-http"

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def drop_clients(self) -> None:
        """Cut every open client connection, so that handler threads end now."""
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def start(self, name: str | None = None, poll_interval: float = 0.1) -> Self:
        """Serve in a daemon thread named `name` (default: `thread_name`)."""
        self._thread = threading.Thread(target=self.serve_forever,
                                        kwargs={"poll_interval": poll_interval},
                                        name=name or self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut open connections, close; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self.shutdown()
            thread.join(timeout)
        self.drop_clients()
        self.server_close()


class BodyError(Exception):
    """A request body that cannot be read: `code` is the answer (400 or 413)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class BaseHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive request handler that logs through `logger` (debug level)."""

    protocol_version = "HTTP/1.1"
    logger = log

    def log_message(self, format: str, *args: Any) -> None:
        self.logger.debug("%s %s", self.address_string(), format % args)

    def send_body(self, code: int, body: bytes, content_type: str,
                  extra_headers: dict[str, str] | None = None, close: bool = False) -> None:
        """A whole answer with Content-Type and Content-Length (no body to HEAD); `close`
        ends the connection after it (said in a ``Connection: close`` header)."""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_not_allowed(self, allow: str, body: bytes = b"method not allowed\n",
                         content_type: str = TEXT_PLAIN) -> None:
        """405 with an Allow header. A request body of up to DRAIN_LIMIT bytes (Content-Length)
        is read and dropped, so the connection stays usable; otherwise it closes after this."""
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= DRAIN_LIMIT:
            self.rfile.read(length)
        else:
            self.close_connection = True
        self.send_body(405, body, content_type, {"Allow": allow})

    def read_body(self, limit: int | None = None) -> bytes:
        """The request body, plain (Content-Length; none: empty) or chunked (trailers
        skipped). BodyError 400 when it is malformed, 413 when it is over `limit` bytes
        (checked before reading that much); the caller should then close the connection."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise BodyError(400, "malformed chunked request body") from None
                total += size
                if limit is not None and total > limit:
                    raise BodyError(413, f"request body over {limit} bytes")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        text = self.headers.get("Content-Length")
        if text is None:
            return b""
        try:
            length = int(text)
            if length < 0:
                raise ValueError(text)
        except ValueError:
            raise BodyError(400, f"invalid Content-Length {text!r}") from None
        if limit is not None and length > limit:
            raise BodyError(413, f"request body of {length} bytes is over the limit of "
                                 f"{limit}")
        return self.rfile.read(length)
