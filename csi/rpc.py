"""What every CSI service shares: turning cachefs errors into gRPC status codes, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from cachefs.errors import CachefsError

log = logging.getLogger("cachefs.csi")

T = TypeVar("T")
DRIVER_NAME = "csi.cachefs.io"
TOPOLOGY_KEY = "topology.csi.cachefs.io/node"


class RpcAbort(Exception):
    """Abort the current RPC with a specific status (raised by argument checks)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RpcAbort:
    return RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, message)


def rpc(fn: Callable[..., T]) -> Callable[..., T]:
    """Run an RPC method; map RpcAbort and CachefsError to status codes, anything else INTERNAL."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except RpcAbort as e:
            log.info("%s: %s: %s", fn.__name__, e.code.name, e)
            context.abort(e.code, str(e))
        except CachefsError as e:
            code = grpc.StatusCode[e.grpc_status]
            log.info("%s: %s: %s", fn.__name__, code.name, e)
            context.abort(code, str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
