"""The shared cluster token of cachefs's gRPC servers (docs/design.md, "Security").

- `load_token` reads it from ``--token-file FILE`` or else ``CACHEFS_TOKEN``; None means none.
- `TokenInterceptor` makes a server refuse every call whose metadata lacks
  ``authorization: Bearer TOKEN`` with UNAUTHENTICATED (compared in constant time).
- `check_listen` enforces that a server without a token listens on loopback only.
- `bearer_metadata` is what a client sends.
- `listening_server` builds a token-guarded gRPC server bound to a `--listen` address (the
  storage server's, the master's and the peer server's); `serve_until_signalled` runs one until
  SIGTERM or SIGINT and stops it gracefully (the storage and peer servers').
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from cachefs.errors import UsageError

log = logging.getLogger("cachefs.grpc")

TOKEN_ENV = "CACHEFS_TOKEN"
METADATA_KEY = "authorization"


def load_token(token_file: str | None) -> str | None:
    """The token of ``--token-file`` (surrounding whitespace stripped), else of CACHEFS_TOKEN,
    else None. An unreadable or empty file is a UsageError: never silently run open."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"--token-file {token_file}: cannot read it: {e.strerror}") from e
        if not token:
            raise UsageError(f"--token-file {token_file}: the file is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, token: str | None, option: str = "--listen") -> None:
    """A server without a token listens on loopback only: refuse anything else."""
    if token is None and not is_loopback(host):
        raise UsageError(
            f"{option} {host}: a server without a token listens on loopback only "
            f"(127.0.0.1, ::1, localhost); give --token-file FILE or set {TOKEN_ENV} to listen "
            "on other addresses")


def _refuse(message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer TOKEN`` (UNAUTHENTICATED). Every RPC
    this guards is unary-unary, which is the shape the refusal handler has."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._missing = _refuse(
            f"missing token: this server needs the metadata '{METADATA_KEY}: Bearer TOKEN' "
            f"(the cluster token: --token-file or {TOKEN_ENV})")
        self._wrong = _refuse("wrong token: the cluster token sent is not this server's")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        sent = None
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == METADATA_KEY:
                sent = value
        if sent is None:
            return self._missing
        if isinstance(sent, str):
            sent = sent.encode()
        if not hmac.compare_digest(sent, self._expected):
            return self._wrong
        return continuation(handler_call_details)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_server(listen: str, token: str | None, workers: int, thread_prefix: str,
                     options: list[tuple[str, Any]],
                     option: str = "--listen",
                     observers: Sequence[grpc.ServerInterceptor] = ()
                     ) -> tuple[grpc.Server, str]:
    """A gRPC server (not started) that refuses calls without `token` (if any), bound to
    `listen`, and the address it bound (the real port when `listen` asks for port 0).
    Refuses a non-loopback address without a token, and an address it cannot bind.
    `observers` (e.g. cachefs.metrics.GrpcMetrics) see every call, refused ones included."""
    from concurrent import futures

    from cachefs.httpserver import parse_listen

    host, port = parse_listen(listen, option)
    check_listen(host, token, option)
    interceptors = [*observers, *([TokenInterceptor(token)] if token else [])]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
        interceptors=interceptors, options=options)
    try:
        bound = server.add_insecure_port(grpc_address(host, port))
    except RuntimeError as e:
        raise UsageError(f"{option} {listen}: cannot listen there: {e}") from e
    if not bound:
        raise UsageError(f"{option} {listen}: cannot listen there (address in use?)")
    return server, grpc_address(host, bound)


def serve_until_signalled(server: grpc.Server, address: str, token: str | None, what: str,
                          ready: Callable[[str], None] | None = None, grace: float = 10.0,
                          started: Callable[[], None] | None = None,
                          stopping: Callable[[], None] | None = None) -> None:
    """Start `server` (bound to `address`), then call `started()` and `ready(address)`; serve
    until SIGTERM or SIGINT; then call `stopping()`, stop accepting calls and let those in
    flight finish (up to `grace` seconds). The server is stopped however this ends, and the
    previous signal handlers are restored."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        if token is None:
            log.warning("no token (--token-file or CACHEFS_TOKEN): serving without "
                        "authentication, on loopback only")
        log.info("%s serving on %s", what, address)
        if started is not None:
            started()
        if ready is not None:
            ready(address)
        stop.wait()
        log.info("%s stopping: finishing the calls in flight", what)
        if stopping is not None:
            stopping()
        server.stop(grace=grace).wait()
    finally:
        server.stop(grace=None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
