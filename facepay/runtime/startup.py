"""Start-up waits: a component started before the services it needs (Redis, a Qdrant server)
waits for them, saying so, for a bounded time (`startup_wait_s`), instead of failing at the first
refused connection and restarting in a loop. What is not a passing unavailability (a wrong
password, a missing permission) fails at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from facepay.redaction import redact
from facepay.runtime.redis_conn import Backoff

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class DependencyUnavailable(RuntimeError):
    """A service this component needs did not answer within startup_wait_s."""


def wait_for(
    what: str,
    attempt: Callable[[], object],
    passing: Callable[[BaseException], bool],
    within_s: float,
    on_wait: Callable[[str], None] = lambda _reason: None,
    stopping: Callable[[], bool] = lambda: False,
) -> bool:
    """Call `attempt` until it succeeds (True); errors for which `passing` holds are waited out
    (with a log line when the wait starts and every LOG_EVERY_S), for at most `within_s`; others
    raise. False when `stopping` turns true meanwhile (SIGTERM): the process is not to wait on."""
    started = time.monotonic()
    backoff, last_log = Backoff(first_s=0.1, max_s=2.0), None
    while not stopping():
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
            backoff.wait(max(0.0, min(backoff.next_s, within_s - waited)))
            continue
        if last_log is not None:
            log.info("%s answers", what, extra={"waited_s": round(time.monotonic() - started, 1)})
        return True
    return False
