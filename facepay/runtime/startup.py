"""Start-up waits: a component started before the services it needs (Redis, a Qdrant server)
waits for them, saying so, for a bounded time (`startup_wait_s`), instead of failing at the first
refused connection and restarting in a loop. What is not a passing unavailability (a wrong
password, a missing permission) fails at once. A stop request (SIGTERM: the pod deleted) ends
every such wait at once, also those deep in a stage's start-up (the recognizer's wait for its
Qdrant server): the worker runs its start-up under `stop_requests`, which every wait consults."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from facepay.redaction import redact
from facepay.runtime.redis_conn import Backoff

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class DependencyUnavailable(RuntimeError):
    """A service this component needs did not answer within startup_wait_s."""


class StopRequested(Exception):
    """The component was asked to stop (SIGTERM, SIGINT) while it waited for a service at
    start-up: not an error, the process stops as from a normal stop."""


_local = threading.local()


@contextmanager
def stop_requests(stopping: Callable[[], bool]) -> Iterator[None]:
    """Every start-up wait in this thread, meanwhile, ends with StopRequested once `stopping` holds."""
    outer = getattr(_local, "stopping", None)
    _local.stopping = stopping
    try:
        yield
    finally:
        _local.stopping = outer


def stop_requested() -> bool:
    """Whether this thread's start-up was asked to stop (see `stop_requests`)."""
    stopping = getattr(_local, "stopping", None)
    return bool(stopping and stopping())


POLL_S = 0.1  # how soon a wait notices a stop request


def wait_for(
    what: str,
    attempt: Callable[[], object],
    passing: Callable[[BaseException], bool],
    within_s: float,
    on_wait: Callable[[str], None] = lambda _reason: None,
) -> None:
    """Call `attempt` until it succeeds; errors for which `passing` holds are waited out (with a
    log line when the wait starts and every LOG_EVERY_S), for at most `within_s`; others raise.
    StopRequested as soon as this thread's start-up is asked to stop (`stop_requests`)."""
    started = time.monotonic()
    backoff, last_log = Backoff(first_s=0.1, max_s=2.0, sleep=lambda s: _sleep(s, what)), None
    while True:
        _raise_if_stopping(what)
        try:
            attempt()
        except Exception as exc:
            if not passing(exc):
                raise
            waited = time.monotonic() - started
            if waited >= within_s:
                raise DependencyUnavailable(
                    f"{what} did not answer within {within_s:g} s (FACEPAY_STARTUP_WAIT_S): {redact(str(exc))}"
                ) from exc
            if last_log is None or time.monotonic() - last_log >= LOG_EVERY_S:
                last_log = time.monotonic()
                log.warning(
                    "waiting for %s",
                    what,
                    extra={"waited_s": round(waited, 1), "bound_s": within_s, "error": redact(str(exc))[:300]},
                )
            on_wait(f"{what} unreachable")
            backoff.wait(at_most_s=within_s - waited)
            continue
        if last_log is not None:
            log.info("%s answers", what, extra={"waited_s": round(time.monotonic() - started, 1)})
        return


def _sleep(seconds: float, what: str) -> None:
    """Sleep, noticing a stop request within POLL_S."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        _raise_if_stopping(what)
        time.sleep(min(left, POLL_S))


def _raise_if_stopping(what: str) -> None:
    if stop_requested():
        log.info("asked to stop while waiting for %s", what)
        raise StopRequested(f"asked to stop while waiting for {what}")
