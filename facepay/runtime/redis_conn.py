"""Redis connections that survive a server restart: clients reconnect on the next command."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

# Refusals that pass, as opposed to errors in what was asked: the server is full (`maxmemory`
# with noeviction: "OOM command not allowed"), a replica (READONLY: after a failover, until this
# node is promoted or the address leads to the new primary), loading its data (LOADING), without
# its primary (MASTERDOWN), or unreachable. Work meeting them is held and retried, never failed.
_REFUSAL_PREFIXES = {"OOM ": "oom", "READONLY": "readonly", "LOADING": "loading", "MASTERDOWN": "masterdown"}


def backpressure_kind(exc: BaseException) -> str | None:
    """'oom', 'readonly', 'loading', 'masterdown' or 'unavailable' for a refusal that passes; else None."""
    if isinstance(exc, redis.OutOfMemoryError):
        return "oom"
    if isinstance(exc, redis.ReadOnlyError):
        return "readonly"
    if isinstance(exc, redis.BusyLoadingError):
        return "loading"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return "unavailable"
    if isinstance(exc, redis.ResponseError):  # e.g. the refusal of a command inside a script
        message = str(exc)
        return next((kind for prefix, kind in _REFUSAL_PREFIXES.items() if message.startswith(prefix)), None)
    return None


class Backoff:
    """A wait that doubles from first_s up to max_s, and starts over after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 2.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.next_s = first_s
        self.waiting_since: float | None = None

    def wait(self, at_most_s: float | None = None) -> float:
        """Sleep the current delay; returns how long this stretch of waiting has lasted so far."""
        now = time.monotonic()
        self.waiting_since = self.waiting_since or now
        time.sleep(self.next_s if at_most_s is None else min(self.next_s, at_most_s))
        self.next_s = min(self.next_s * 2, self.max_s)
        return time.monotonic() - self.waiting_since

    def reset(self) -> float | None:
        """Start over; returns how long the stretch of waiting that ends here lasted, if any."""
        waited = None if self.waiting_since is None else time.monotonic() - self.waiting_since
        self.next_s, self.waiting_since = self.first_s, None
        return waited


def connect(url: str, block_ms: int = 1000) -> redis.Redis:
    """A client whose socket timeout outlasts the longest XREAD BLOCK it will issue."""
    return redis.Redis.from_url(
        url,
        socket_timeout=block_ms / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=False,
    )


def with_retry(fn: Callable[[], T], what: str, deadline_s: float = 60.0) -> T:
    """Call fn until the server answers (restart, loading AOF, full, read-only); give up after deadline_s."""
    delay, start = 0.1, time.monotonic()
    while True:
        try:
            return fn()
        except redis.RedisError as exc:
            if backpressure_kind(exc) is None or time.monotonic() - start > deadline_s:
                raise
            log.warning("redis unavailable, retrying", extra={"what": what, "error": str(exc), "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
