"""The pins of provisioned volumes: CreateVolume pins the commit it resolved, DeleteVolume unpins.

A dynamically provisioned volume shows one commit for as long as it exists, whatever its branch
does meanwhile, so the controller pins that commit (`cachefs.dataset.pins`) under a name derived
from the volume id, held by the volume and without a lease: gc keeps the version until the
volume is deleted. Both calls are idempotent (the same name pins the same commit; removing an
absent pin succeeds), as CSI retries them. A remote the controller's credentials cannot write
leaves the volume unpinned, with a warning: provisioning does not fail for it (mounts of the
volume still pin it with their leases while they run). A static PV is pinned by its mounts only.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping

from cachefs.config import Config
from cachefs.dataset.pins import PinStore
from cachefs.errors import NotFound, PermissionDenied
from cachefs.remotes.registry import open_remote_url

log = logging.getLogger("cachefs.csi.pins")

LOCK_WAIT_S = 60.0  # behind a gc sweep longer than this: UNAVAILABLE, and the provisioner retries
_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def pin_name(volume_id: str) -> str:
    return f"volume-{volume_id}"


def _refused(error: BaseException) -> bool:
    cause = error.__cause__
    return isinstance(error, PermissionDenied) or (
        isinstance(cause, OSError) and cause.errno in _REFUSED_ERRNOS)


def pin_volume(volume_id: str, context: Mapping[str, str]) -> bool:
    """Pin the volume's commit (context: remote name or URL, dataset, commit); False if the
    remote refused the write (read-only credentials), after a warning."""
    remote = open_remote_url(Config.load().url_of(context["remote"]))
    try:
        PinStore(remote, lock_wait_s=LOCK_WAIT_S).add(
            context["dataset"], context["commit"], pin_name(volume_id),
            holder=f"csi volume {volume_id}")
        return True
    except Exception as e:
        if not _refused(e):
            raise
        log.warning("volume %s is not pinned (the remote refused the write: %s); gc may "
                    "remove its version once no ref reaches it", volume_id, e)
        return False
    finally:
        remote.close()


def unpin_volume(volume_id: str, context: Mapping[str, str]) -> None:
    """Remove the volume's pin (none: nothing to do)."""
    try:
        url = Config.load().url_of(context["remote"])
    except NotFound as e:  # its remote is no longer configured: the volume goes anyway
        log.warning("volume %s: cannot unpin (%s); remove pin %s by hand", volume_id, e,
                    pin_name(volume_id))
        return
    remote = open_remote_url(url)
    try:
        PinStore(remote).remove(pin_name(volume_id))
    except Exception as e:
        if not _refused(e):
            raise
        log.warning("could not unpin volume %s (the remote refused the write: %s)",
                    volume_id, e)
    finally:
        remote.close()
