"""The session rule, as a payment backend relies on it (no Redis, no models)."""

from __future__ import annotations

from facepay.config import SessionPolicy
from services.recognizer.policy import FrameResult, blink_seen, decide

POLICY = SessionPolicy(margin=0.05, min_agreeing_frames=3, require_blink=True)
THRESHOLD = 0.9
OPEN, CLOSED = 0.32, 0.14


def match(seq: int, user: str = "alice", score: float = 0.96, second: float = 0.5, ear: float = OPEN) -> FrameResult:
    return FrameResult(seq, top_user=user, top_score=score, second_score=second, ear=ear)


def blinking(n: int = 6, user: str = "alice") -> list[FrameResult]:
    return [match(i, user, ear=CLOSED if i == n // 2 else OPEN) for i in range(n)]


def test_enough_agreeing_frames_and_a_blink_approve_before_the_session_ends():
    verdict = decide(blinking(), POLICY, THRESHOLD, expected_frames=None)
    assert verdict and verdict.approve and verdict.user_id == "alice" and verdict.rule == "matched"


def test_a_replayed_still_photo_never_blinks_and_is_declined_for_liveness():
    frames = [match(i) for i in range(20)]
    assert decide(frames, POLICY, THRESHOLD, expected_frames=None) is None, "waits: a blink may still come"
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=20)
    assert not verdict.approve and verdict.reasons == ["no_liveness"]


def test_relaxing_the_blink_rule_approves_still_photos():
    relaxed = SessionPolicy(margin=0.05, min_agreeing_frames=3, require_blink=False)
    assert decide([match(i) for i in range(3)], relaxed, THRESHOLD, expected_frames=3).approve


def test_a_stranger_is_declined_as_unknown():
    frames = [match(i, score=0.6, ear=CLOSED if i == 2 else OPEN) for i in range(6)]
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=6)
    assert not verdict.approve and verdict.reasons == ["unknown_face"] and verdict.user_id == ""


def test_best_and_second_best_too_close_is_ambiguous():
    frames = [match(i, score=0.95, second=0.93) for i in range(6)]
    assert decide(frames, POLICY, THRESHOLD, expected_frames=6).reasons == ["ambiguous_match"]


def test_frames_that_disagree_on_the_user_are_ambiguous():
    frames = blinking(6, "alice") + [match(10 + i, "bob") for i in range(4)]
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=10)
    assert not verdict.approve and verdict.reasons == ["ambiguous_match"]


def test_a_session_without_any_face_is_declined_no_face():
    frames = [FrameResult(i, reason="no_face") for i in range(5)]
    assert decide(frames, POLICY, THRESHOLD, expected_frames=5).reasons == ["no_face"]


def test_side_views_only_are_declined_not_frontal():
    frames = [FrameResult(i, reason="pose_yaw", ear=OPEN) for i in range(5)]
    assert decide(frames, POLICY, THRESHOLD, expected_frames=5).reasons == ["not_frontal"]


def test_too_few_agreeing_frames_declines():
    frames = [match(0), match(1, ear=CLOSED), match(2, score=0.5)]
    assert decide(frames, POLICY, THRESHOLD, expected_frames=3).reasons == ["too_few_frames"]


def test_a_session_whose_frames_stop_coming_is_declined_on_timeout():
    verdict = decide([], POLICY, THRESHOLD, expected_frames=None, timed_out=True)
    assert not verdict.approve and verdict.reasons == ["timeout"]


def test_blink_needs_open_closed_open_relative_to_the_sessions_own_eyes():
    assert blink_seen([0.30, 0.31, 0.12, 0.30], POLICY)
    assert not blink_seen([0.30, 0.31, 0.12], POLICY), "eyes never reopened"
    assert not blink_seen([0.30] * 10, POLICY)
    assert not blink_seen([0.30, 0.29, 0.31, 0.28, 0.30], POLICY), "landmark jitter is not a blink"


def test_agreeing_frames_that_fail_only_the_passive_anti_spoof_rule_are_declined_as_spoofs():
    """Blink not required, anti-spoof required: the only failed rule is the passive one."""
    passive_only = SessionPolicy(margin=0.05, min_agreeing_frames=3, require_blink=False, min_passive_liveness=0.5)
    frames = [
        FrameResult(i, top_user="alice", top_score=0.96, second_score=0.5, ear=OPEN, antispoof=0.1) for i in range(4)
    ]
    verdict = decide(frames, passive_only, THRESHOLD, expected_frames=4)
    assert not verdict.approve and verdict.reasons == ["spoof_suspected"]
