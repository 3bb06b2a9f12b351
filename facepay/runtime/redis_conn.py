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
    """Call fn until the server answers (restart, loading AOF); give up after deadline_s."""
    delay, start = 0.1, time.monotonic()
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            if time.monotonic() - start > deadline_s:
                raise
            log.warning("redis unavailable, retrying", extra={"what": what, "error": str(exc), "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
