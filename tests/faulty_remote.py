"""Real remotes wrapped to misbehave the way networks do (for fault tests).

`LostReplyRemote` performs a put-if-absent on the real remote and then answers False, as an SDK
that lost the reply and retried the request would: the retry finds the object (its own) already
there. The first `times` creates of keys under `prefix` get this; everything else passes through.
"""

from __future__ import annotations

from cachefs.remotes.base import Remote
from tests.recording_remote import RecordingRemote


class LostReplyRemote(RecordingRemote):
    """Forwards every call; the first `times` put_if_absent under `prefix` report False although
    they created the object (a lost reply, then a retry that saw "already exists")."""

    def __init__(self, inner: Remote, prefix: str, times: int = 1) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.times = times
        self.lost = 0  # replies lost so far

    def put_if_absent(self, key: str, data: bytes) -> bool:
        created = super().put_if_absent(key, data)
        if created and key.startswith(self.prefix) and self.lost < self.times:
            self.lost += 1
            return False
        return created
