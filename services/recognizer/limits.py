"""Failure limits for biometric attempts, per camera and per user, kept in Redis so that they
survive worker restarts and hold across recognizer replicas (see `FailureLimits`).

A failed attempt is a declined payment session that showed a face: unknown, ambiguous, not
live, too few agreeing frames. It counts against the camera, and against a user when frames
matched that user but the session still failed (someone presented their face and failed
liveness, say). An approval resets both counts. From `max_consecutive` failures on, each
further failure sets a back-off of `first_delay_s`·2^(n − max) during which sessions are
declined `locked_out`; at `hard_limit` the camera or user stays locked until an operator
resets it (`facepay lockouts reset`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from facepay.config import FailureLimits, Settings
from facepay.vocabulary import Reason

COUNTED_FAILURES = frozenset({Reason.UNKNOWN_FACE, Reason.AMBIGUOUS_MATCH, Reason.NO_LIVENESS, Reason.TOO_FEW_FRAMES})
COUNTER_TTL_S = 30 * 24 * 3600
MAX_DELAY_S = 24 * 3600


class FailureLimiter:
    """`clock` (seconds since the epoch, the same on every replica) decides when a back-off
    ends: the back-off key holds its end time; its Redis expiry only clears it away later."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.settings = settings
        self.limits: FailureLimits = settings.limits
        self.clock = clock

    def _key(self, kind: str, subject: str, what: str) -> str:
        return self.settings.key("limits", kind, subject, what)

    def locked(self, camera_id: str, user_id: str = "") -> str | None:
        """'camera' or 'user' when that subject is in back-off or locked, else None."""
        subjects = [("camera", camera_id)] + ([("user", user_id)] if user_id else [])
        pipe = self.redis.pipeline(transaction=False)
        for kind, subject in subjects:
            pipe.exists(self._key(kind, subject, "locked"))
            pipe.get(self._key(kind, subject, "backoff"))
        answers = pipe.execute()
        now = self.clock()
        for (kind, _), hard_locked, backoff_until in zip(subjects, answers[::2], answers[1::2], strict=True):
            if hard_locked or (backoff_until is not None and now < float(backoff_until)):
                return kind
        return None

    def record(self, session_id: str, camera_id: str, rule: str, approved: bool, candidate_user: str = "") -> None:
        """Count a session's outcome once, even if a redelivery makes it decide again."""
        if not self.redis.set(self._key("session", session_id, "counted"), 1, nx=True, ex=COUNTER_TTL_S):
            return
        subjects = [("camera", camera_id)] + ([("user", candidate_user)] if candidate_user else [])
        if approved:
            for kind, subject in subjects:  # one key at a time: on a cluster each has its own slot
                self.redis.delete(self._key(kind, subject, "failures"))
            return
        if rule not in COUNTED_FAILURES:
            return
        for kind, subject in subjects:
            self._fail(kind, subject)

    def _fail(self, kind: str, subject: str) -> None:
        counter = self._key(kind, subject, "failures")
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(counter)
        pipe.expire(counter, COUNTER_TTL_S)
        failures = pipe.execute()[0]
        if failures >= self.limits.hard_limit:
            self.redis.set(self._key(kind, subject, "locked"), failures)
        elif failures >= self.limits.max_consecutive:
            delay = min(self.limits.first_delay_s * 2 ** (failures - self.limits.max_consecutive), MAX_DELAY_S)
            self.redis.set(self._key(kind, subject, "backoff"), repr(self.clock() + delay), ex=int(delay) + 2)

    def reset(self, kind: str, subject: str) -> int:
        """Operator reset: clears the count, the back-off and a hard lock."""
        return self.redis.delete(*[self._key(kind, subject, w) for w in ("failures", "backoff", "locked")])
