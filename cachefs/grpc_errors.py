"""cachefs errors across gRPC, both ways, in one place.

Server side, `rpc` wraps a servicer method: `RpcAbort` (argument checks) aborts with its code,
a `CachefsError` with the status its class names (`grpc_status` in cachefs/errors.py), anything
else with INTERNAL. Client side, `error_from_rpc` turns a `grpc.RpcError` back into the cachefs
exception of its status (`ERROR_OF_STATUS`, the inverse of `grpc_status`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from cachefs import errors

log = logging.getLogger("cachefs.grpc")

T = TypeVar("T")


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
        except errors.CachefsError as e:
            code = grpc.StatusCode[e.grpc_status]
            log.info("%s: %s: %s", fn.__name__, code.name, e)
            context.abort(code, str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


# The cachefs exception a client raises for each status (the inverse of `grpc_status`); a
# status not listed becomes RemoteError.
ERROR_OF_STATUS: dict[grpc.StatusCode, type[errors.CachefsError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.NOT_FOUND: errors.ObjectNotFound,
    grpc.StatusCode.DATA_LOSS: errors.CorruptObject,
    grpc.StatusCode.INVALID_ARGUMENT: errors.UsageError,
    grpc.StatusCode.OUT_OF_RANGE: errors.UsageError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.UsageError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.ABORTED: errors.RefConflict,
    grpc.StatusCode.FAILED_PRECONDITION: errors.RemoteUnsupported,
    grpc.StatusCode.UNAVAILABLE: errors.RemoteError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.RemoteError,
}


def rpc_status(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed call's status code and the server's message (UNKNOWN and the error's text for
    an error that carries no status)."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    return code, details


def error_from_rpc(e: grpc.RpcError, what: str) -> errors.CachefsError:
    """The cachefs exception for a failed call; `what` (e.g. ``storage 10.0.0.5:8700 Get``)
    prefixes the server's message."""
    code, details = rpc_status(e)
    cls = ERROR_OF_STATUS.get(code, errors.RemoteError)
    return cls(f"{what}: {code.name}: {details}")
