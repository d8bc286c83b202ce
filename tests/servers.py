"""Real servers for tests: moto's S3 server as a subprocess, and a proxy that ignores put-if-absent.

Everything here binds 127.0.0.1 only, waits for readiness by polling with a deadline (never a
fixed sleep), and shuts down within a bounded time, killing what does not stop.

- `MotoServer` runs ``python -m moto.server`` on a free loopback port; its output goes to a
  temporary log file (a pipe could fill up and stall the server), shown when startup fails.
- `IgnoringPutIfAbsentProxy` is a reverse proxy in front of an S3 endpoint that forwards every
  request unchanged except that it drops ``If-None-Match`` from PUTs: a real S3-compatible
  endpoint that silently ignores put-if-absent, like s3rver and some emulators.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Self

from cachefs.httpserver import BaseHandler, ServiceHTTPServer

LOOPBACK = "127.0.0.1"

# The credentials and region every test client and server uses; nothing reaches real AWS.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables from the machine that must not leak into test clients or servers.
AWS_UNSET_ENV = ("AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate()` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def aws_test_environ() -> dict[str, str]:
    """A copy of os.environ with the test credentials set and machine AWS settings removed."""
    env = dict(os.environ)
    for name in AWS_UNSET_ENV:
        env.pop(name, None)
    env.update(AWS_TEST_ENV)
    return env


class ServerContext:
    """`with server:` starts a test server and stops it however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServiceProcess:
    """What tests do to a server subprocess they started (`proc`, logging to `log`): kill -9
    it, or stop it with SIGTERM as a service manager would and get its exit status."""

    proc: subprocess.Popen[bytes] | None = None
    stop_timeout = 30.0

    def output(self) -> str:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM; the exit status (an AssertionError, after a kill, if it does not exit)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"no exit {self.stop_timeout:g} s after SIGTERM:\n"
                                     f"{self.output()}") from None
        return self.proc.returncode


class MotoServer(ServerContext):
    """moto's S3 server in a subprocess on a free loopback port; a context manager."""

    def __init__(self, startup_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="cachefs-moto-", suffix=".log", delete=False
        )
        self._admin: Any = None  # boto3 S3 client, created on first use

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        """The server's output so far (for failure messages)."""
        try:
            with open(self._log.name, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _responds(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited with status {self._proc.returncode} during startup:\n"
                + self.log_text()[-4000:]
            )
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            conn.request("GET", "/moto-api/data.json")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> Self:
        """Start the server and return once it answers HTTP (RuntimeError if it cannot)."""
        if self._proc is not None:
            raise RuntimeError("moto server already started")
        # The port is picked before the server binds it; on the rare race with another process,
        # the server exits at once and we try another port.
        for attempt in range(3):
            self.port = free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=aws_test_environ(),
            )
            try:
                wait_until(self._responds, self.startup_timeout, f"moto server on {self.endpoint}")
                return self
            except RuntimeError:
                self._terminate()
                if attempt == 2:
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)

    def stop(self) -> None:
        """Stop the server (terminate, then kill after `stop_timeout`); safe to call twice."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self._terminate()
        if not self._log.closed:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)

    def client(self) -> Any:
        """A new boto3 S3 client for this server (test credentials); the caller closes it."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        ).client(
            "s3",
            endpoint_url=self.endpoint,
            # Plain HTTP: no certificate is ever checked, so the machine's AWS_CA_BUNDLE (if
            # any) is not even loaded.
            verify=False,
        )

    def create_bucket(self, name: str) -> None:
        if self._admin is None:
            self._admin = self.client()
        self._admin.create_bucket(Bucket=name)


# Headers that describe one hop, not the message: never forwarded as they are.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


class KeepAliveHandler(BaseHandler):
    """`BaseHandler` (HTTP/1.1 keep-alive, as pooled SDK connections expect; `read_body` for
    plain and chunked request bodies) that drops idle or stalled clients."""

    timeout = 30  # an idle or stalled client connection is dropped after this long


class _ProxyHandler(KeepAliveHandler):
    server: _ProxyServer

    def _forward(self) -> None:
        body = self.read_body()
        upstream = http.client.HTTPConnection(
            self.server.upstream_host, self.server.upstream_port, timeout=30
        )
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lname = name.lower()
                if lname in _HOP_BY_HOP or lname == "content-length":
                    continue
                if lname == "if-none-match" and self.command == "PUT":
                    self.server.stripped += 1
                    continue
                upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            payload = response.read()
            chunked = response.getheader("Transfer-Encoding") is not None
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                lname = name.lower()
                if lname in _HOP_BY_HOP or (chunked and lname == "content-length"):
                    continue
                self.send_header(name, value)
            if chunked:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    def do_GET(self) -> None:
        self._forward()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET


class LoopbackHTTPServer(ServiceHTTPServer):
    """A `ServiceHTTPServer` on 127.0.0.1 (a free port) whose `stop` also joins every handler
    thread (after cutting their connections, so it never waits on clients)."""

    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((LOOPBACK, 0), handler)

    def start(self, name: str | None = None, poll_interval: float = 0.05) -> Self:
        return super().start(name, poll_interval)


class _ProxyServer(LoopbackHTTPServer):
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.stripped = 0  # how many If-None-Match headers were dropped
        super().__init__(_ProxyHandler)


class IgnoringPutIfAbsentProxy(ServerContext):
    """A loopback HTTP reverse proxy to `upstream` (http://host:port) that drops If-None-Match
    from PUT requests, so that put-if-absent silently becomes a plain put; a context manager."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self._server = _ProxyServer(host, int(port or 80))
        self.port = int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def stripped(self) -> int:
        """How many PUTs had their If-None-Match removed so far."""
        return self._server.stripped

    def start(self) -> Self:
        self._server.start(f"put-if-absent-ignoring-proxy:{self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut open connections, join every thread; safe to call twice."""
        self._server.stop(timeout)
