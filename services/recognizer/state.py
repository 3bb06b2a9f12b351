"""Session state in Redis, so that any recognizer replica can finish any session.

`{ns}:session:{id}` is a hash: `f:<seq>` → one FrameResult (written once per frame, so a
redelivered frame changes nothing), `end` → the frame count the camera announced, `meta` →
store, camera and timing. `{ns}:sessions:open` is a sorted set of sessions by deadline, swept
for timeouts. `{ns}:decided:{id}` is set by the runtime when the decision is written.
With partitions (facepay.runtime.partitions) each of these is the session's partition's —
`{ns}:{p07}:session:{id}`, `{ns}:{p07}:sessions:open`, `{ns}:{p07}:decided:{id}` — one hash
slot per session, so each transaction below stays on one slot of a cluster.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import msgpack
import redis

from facepay import sessions
from facepay.config import Settings
from facepay.messages import FrameRef
from facepay.runtime.partitions import Partitions
from facepay.sessions import decided_key
from services.recognizer.policy import FrameResult

STATE_TTL_S = 24 * 3600
QUARANTINE_TTL_S = 7 * 24 * 3600


_FRAME_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(FrameResult))


def _frame_result(stored: dict) -> FrameResult:
    """A stored frame result. Fields a newer recognizer added are left out: during a rolling
    upgrade an older replica decides with what it knows, as it did before the upgrade, instead
    of declining every session in flight as unreadable. A missing required field still raises."""
    if not isinstance(stored, dict):
        raise TypeError(f"a frame result is a map, not {type(stored).__name__}")
    return FrameResult(**{k: v for k, v in stored.items() if k in _FRAME_RESULT_FIELDS})


class UnreadableState(ValueError):
    """A session's stored state cannot be decoded (corrupt, or written by another version)."""


@dataclass(frozen=True)
class SessionState:
    meta: FrameRef
    results: list[FrameResult]
    expected_frames: int | None
    models: dict[str, str]


def session_key(ref: FrameRef) -> str:
    """The session `ref` belongs to, as the whole pipeline spells it (`facepay.sessions`)."""
    return sessions.session_key(ref.store_id, ref.session_id)


class SessionStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.partitions = Partitions.of(settings)

    def _key(self, key: str) -> str:
        return self.partitions.session_key(key, "session", key)

    def _open_key(self, key: str) -> str:
        """The sorted set of open sessions of `key`'s partition."""
        return self.partitions.session_key(key, "sessions", "open")

    def decided_key(self, key: str) -> str:
        return self.partitions.session_key(key, decided_key(key))

    def is_decided(self, keys: list[str]) -> dict[str, bool]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.decided_key(key))
        return dict(zip(keys, (bool(x) for x in pipe.execute()), strict=True))

    def record(
        self,
        ref: FrameRef,
        result: FrameResult | None = None,
        frame_count: int | None = None,
        models: dict[str, str] | None = None,
    ) -> None:
        """Remember a frame result (or the end marker) once; every frame pushes the session's
        timeout further out, so it fires only when frames stop coming."""
        skey = session_key(ref)
        key = self._key(skey)
        deadline_ms = int(time.time() * 1000 + self.settings.policy.session_timeout_s * 1000)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "meta", msgpack.packb(dataclasses.asdict(ref)))
        if result is not None:
            pipe.hsetnx(key, f"f:{result.sequence}", msgpack.packb(dataclasses.asdict(result)))
        if models:
            pipe.hsetnx(key, "models", msgpack.packb(models))
        if frame_count is not None:
            pipe.hset(key, "end", frame_count)
        pipe.expire(key, STATE_TTL_S)
        pipe.zadd(self._open_key(skey), {skey: deadline_ms}, gt=True)
        pipe.execute()

    def load(self, key: str) -> SessionState | None:
        """The session's state, None when there is none, UnreadableState when it cannot be read."""
        raw = self.redis.hgetall(self._key(key))
        if b"meta" not in raw:
            return None
        try:
            results = [_frame_result(msgpack.unpackb(v)) for k, v in raw.items() if k.startswith(b"f:")]
            expected = int(raw[b"end"]) if b"end" in raw else None
            models = msgpack.unpackb(raw[b"models"]) if b"models" in raw else {}
            return SessionState(FrameRef(**msgpack.unpackb(raw[b"meta"])), results, expected, models)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise UnreadableState(f"session {key}: {exc!r}") from exc

    def meta(self, key: str) -> FrameRef | None:
        """Only the session's store, camera and tenant (for declining a session whose frames
        cannot be read), None when that too is unreadable."""
        raw = self.redis.hget(self._key(key), "meta")
        try:
            return FrameRef(**msgpack.unpackb(raw)) if raw else None
        except (ValueError, TypeError, msgpack.UnpackException):
            return None

    def forget(self, key: str) -> None:
        """Erase a decided session's state: its frame embeddings are biometric data, kept no
        longer than the decision needs them."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._key(key))
        pipe.zrem(self._open_key(key), key)
        pipe.execute()

    def quarantine(self, key: str) -> str:
        """Move an unreadable state aside (for an operator to inspect, for a week at most), out
        of the sweep; returns where it went."""
        aside = self.partitions.session_key(key, "quarantine", "session", key)  # RENAME: one slot
        pipe = self.redis.pipeline(transaction=True)
        pipe.rename(self._key(key), aside)
        pipe.expire(aside, QUARANTINE_TTL_S)
        pipe.zrem(self._open_key(key), key)
        try:
            pipe.execute()
        except redis.ResponseError as exc:  # already moved (by another replica) or gone
            if "no such key" not in str(exc).lower():
                raise
            self.redis.zrem(self._open_key(key), key)
        return aside

    def overdue(self, limit: int = 100) -> list[str]:
        """Sessions past their deadline, from every partition (at most `limit` of each)."""
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for open_key in self.partitions.all("sessions", "open"):
            pipe.zrangebyscore(open_key, 0, now_ms, start=0, num=limit)
        return [s.decode() for found in pipe.execute() for s in found]

    def close(self, key: str) -> None:
        """Forget a decided session: its state holds names, embeddings and (enrollment) chips,
        none of which is needed once the decision is written."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self._open_key(key), key)
        pipe.delete(self._key(key))
        pipe.execute()
