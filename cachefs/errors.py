"""The one exception hierarchy of cachefs, each class mapped to errno, gRPC status and exit code.

Library code raises these; each boundary translates them exactly once: the CLI turns them into
an exit code and one line on stderr, the FUSE layer into an errno, the gRPC servers into a status
code (named here as a string so this module imports nothing heavy), the HTTP gateway into an
HTTP status and an S3 error code.
"""

from __future__ import annotations

import errno as _errno


class CachefsError(Exception):
    """Base of every error cachefs raises on purpose."""

    errno: int = _errno.EIO
    exit_code: int = 1
    grpc_status: str = "INTERNAL"
    http_status: int = 500
    s3_code: str = "InternalError"


class UsageError(CachefsError):
    """The command line or an argument is malformed."""

    errno = _errno.EINVAL
    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"
    http_status = 400
    s3_code = "InvalidArgument"


class InvalidName(UsageError):
    """A dataset, ref or path-entry name breaks the naming rules."""


class ConfigError(UsageError):
    """The configuration file or a remote URL cannot be used."""


class NotFound(CachefsError):
    """Something named does not exist."""

    errno = _errno.ENOENT
    exit_code = 3
    grpc_status = "NOT_FOUND"
    http_status = 404
    s3_code = "NoSuchKey"


class DatasetNotFound(NotFound):
    """The dataset has not been created in this remote."""

    s3_code = "NoSuchBucket"


class RefNotFound(NotFound):
    """No branch, tag or commit matches the given reference."""


class PathNotFound(NotFound):
    """No entry exists at that path in the version."""


class ObjectNotFound(NotFound):
    """A stored object (chunk, tree, commit) is missing from the remote."""

    # Over HTTP the file exists (its tree names the object): the server is at fault.
    http_status = 500
    s3_code = "InternalError"


class AlreadyExists(CachefsError):
    """Creating something that is already there."""

    errno = _errno.EEXIST
    exit_code = 4
    grpc_status = "ALREADY_EXISTS"
    http_status = 409
    s3_code = "BucketAlreadyExists"


class RefConflict(CachefsError):
    """A compare-and-swap on a ref lost a race: the ref moved since it was read."""

    errno = _errno.EAGAIN
    exit_code = 5
    grpc_status = "ABORTED"
    http_status = 409
    s3_code = "OperationAborted"


class CorruptObject(CachefsError):
    """Stored bytes do not match their name (hash) or cannot be decoded."""

    errno = _errno.EIO
    exit_code = 6
    grpc_status = "DATA_LOSS"

    def __init__(self, message: str, object_name: str | None = None) -> None:
        super().__init__(message)
        self.object_name = object_name


class RemoteError(CachefsError):
    """The remote store failed or cannot be reached."""

    errno = _errno.EIO
    exit_code = 7
    grpc_status = "UNAVAILABLE"
    http_status = 503
    s3_code = "ServiceUnavailable"


class RemoteUnsupported(RemoteError):
    """The remote lacks a capability cachefs needs (e.g. it ignores put-if-absent)."""

    grpc_status = "FAILED_PRECONDITION"


class ReadOnly(CachefsError):
    """A write was attempted on something immutable (a mounted version, a tag)."""

    errno = _errno.EROFS
    exit_code = 8
    grpc_status = "FAILED_PRECONDITION"
    http_status = 403
    s3_code = "AccessDenied"


class LocalIOError(CachefsError):
    """Reading the source directory or writing a checkout on the local machine failed."""

    errno = _errno.EIO
    exit_code = 10
    grpc_status = "INTERNAL"


class MountError(CachefsError):
    """A mount could not be started, queried or stopped."""

    errno = _errno.EIO
    exit_code = 11
    grpc_status = "FAILED_PRECONDITION"


class MountHung(MountError):
    """A mount daemon did not answer within the bound: stopped, deadlocked or swamped."""

    grpc_status = "UNAVAILABLE"


class PermissionDenied(CachefsError):
    """A token or credential was refused."""

    errno = _errno.EACCES
    exit_code = 9
    grpc_status = "PERMISSION_DENIED"
    http_status = 403
    s3_code = "AccessDenied"


class RepositoryBusy(CachefsError):
    """The repository is locked by an operation that excludes this one (gc against writers)."""

    errno = _errno.EBUSY
    exit_code = 12
    grpc_status = "UNAVAILABLE"
    http_status = 503
    s3_code = "ServiceUnavailable"


class LockLost(RepositoryBusy):
    """A writer's repository lock went stale (refreshes failed) or was removed before its ref
    moved: gc may have deleted objects the writer reused, so the ref is left where it was."""
