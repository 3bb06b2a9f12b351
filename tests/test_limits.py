"""Failure limits (NIST SP 800-63B §5.2.2/§5.2.3) on a real Valkey, with a clock the test moves:
the back-off's growth is checked to the second without waiting for it."""

from __future__ import annotations

import uuid

import pytest
import redis

from facepay.config import FailureLimits, Settings
from facepay.runtime.embedded import EmbeddedValkey
from services.recognizer.limits import FailureLimiter

LIMITS = FailureLimits(max_consecutive=5, first_delay_s=30.0, hard_limit=10)
YEAR_S = 365 * 24 * 3600.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(valkey, clock) -> FailureLimiter:
    settings = Settings(redis_url=valkey.url, namespace=f"lim{uuid.uuid4().hex[:6]}", limits=LIMITS)
    return FailureLimiter(redis.Redis.from_url(valkey.url), settings, clock=clock)


def fail(limiter: FailureLimiter, times: int, camera: str = "cam-1", user: str = "") -> None:
    for _ in range(times):
        limiter.record(uuid.uuid4().hex, camera, "unknown_face", approved=False, candidate_user=user)


def test_below_the_limit_nothing_is_locked(limiter):
    fail(limiter, LIMITS.max_consecutive - 1)
    assert limiter.locked("cam-1") is None


@pytest.mark.parametrize("failures, delay_s", [(5, 30.0), (6, 60.0), (7, 120.0), (8, 240.0)])
def test_the_back_off_starts_at_the_limit_and_doubles_with_each_further_failure(limiter, clock, failures, delay_s):
    fail(limiter, failures)
    start = clock.now
    clock.now = start + delay_s - 0.5
    assert limiter.locked("cam-1") == "camera", f"still backing off just before {delay_s} s"
    clock.now = start + delay_s + 0.5
    assert limiter.locked("cam-1") is None, f"free again just after {delay_s} s"


def test_a_user_whose_face_kept_failing_backs_off_at_every_camera(limiter, clock):
    fail(limiter, LIMITS.max_consecutive, camera="cam-1", user="mallory")
    assert limiter.locked("cam-2", "mallory") == "user" and limiter.locked("cam-2") is None


def test_the_hard_limit_locks_until_an_operator_resets_it(limiter, clock):
    fail(limiter, LIMITS.hard_limit, user="mallory")
    clock.now += 10 * YEAR_S
    assert limiter.locked("cam-1") == "camera" and limiter.locked("cam-9", "mallory") == "user", "no expiry"
    limiter.reset("camera", "cam-1")
    limiter.reset("user", "mallory")
    assert limiter.locked("cam-1", "mallory") is None


def test_an_approval_resets_the_count(limiter, clock):
    fail(limiter, LIMITS.max_consecutive - 1)
    limiter.record("ok-session", "cam-1", "matched", approved=True)
    fail(limiter, LIMITS.max_consecutive - 1)
    assert limiter.locked("cam-1") is None
