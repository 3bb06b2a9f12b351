"""Attack: liveness borrowed from another face (issue 9, Critical 1).

A victim's photo shown for a few frames wins the vote; then anyone else blinks in front of the
camera. The blink must be seen on the matched face's own track, and a session whose face
changes mid-way is never approved. First the pure rule (no Redis, no models), then the same
attack end to end on real faces with every rule on.
"""

from __future__ import annotations

import math

import pytest
import redis

from facepay.app.camera import video_frames
from facepay.config import SessionPolicy
from facepay.contract import pb
from services.recognizer.policy import FrameResult, decide
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline

POLICY = SessionPolicy(margin=0.05, min_agreeing_frames=3, require_blink=True)
THRESHOLD = 0.9
OPEN, CLOSED = 0.32, 0.14
DIM = 128


def face(cosine_to_victim: float, axis: int) -> list[float]:
    """A unit embedding at a given cosine from the victim's (axis 0); `axis` tells faces apart."""
    vector = [0.0] * DIM
    vector[0] = cosine_to_victim
    vector[axis] = math.sqrt(max(0.0, 1.0 - cosine_to_victim**2))
    return vector


VICTIM = face(1.0, 1)
VICTIM_EYES_CLOSED = face(0.99, 2)  # the same person a moment later: same track
STRANGER = face(0.85, 3)  # another person: what a stranger scores against the victim


def photo_of_victim(seq: int) -> FrameResult:
    return FrameResult(seq, top_user="victim", top_score=0.96, second_score=0.5, ear=OPEN, embedding=VICTIM)


def stranger(seq: int, ear: float, reason: str = "") -> FrameResult:
    """The gallery's nearest user for a stranger is the victim, far below the threshold."""
    return FrameResult(
        seq,
        reason=reason,
        top_user="" if reason else "victim",
        top_score=-1.0 if reason else 0.85,
        second_score=-1.0 if reason else 0.5,
        ear=ear,
        embedding=STRANGER,
    )


def stranger_blinking(first_seq: int, n: int = 6, reason: str = "") -> list[FrameResult]:
    return [stranger(first_seq + i, CLOSED if i == n // 2 else OPEN, reason) for i in range(n)]


def never_approved_frame_by_frame(frames: list[FrameResult], policy: SessionPolicy = POLICY) -> bool:
    """As the recognizer sees it: the rule runs after every frame (early decisions on)."""
    return not any(
        (v := decide(frames[: i + 1], policy, THRESHOLD, expected_frames=None)) and v.approve
        for i in range(len(frames))
    )


def test_a_victims_photo_then_a_stranger_blinking_is_not_approved():
    frames = [photo_of_victim(i) for i in range(3)] + stranger_blinking(3)
    assert never_approved_frame_by_frame(frames)
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=len(frames))
    assert not verdict.approve and verdict.reasons == ["face_changed"]


def test_a_stranger_blinking_first_then_the_victims_photo_is_not_approved():
    frames = stranger_blinking(0) + [photo_of_victim(6 + i) for i in range(3)]
    assert never_approved_frame_by_frame(frames)
    assert decide(frames, POLICY, THRESHOLD, expected_frames=len(frames)).reasons == ["face_changed"]


def test_a_stranger_blinking_on_frames_rejected_for_pose_lends_no_blink():
    frames = [photo_of_victim(i) for i in range(3)] + stranger_blinking(3, reason="pose_yaw")
    assert never_approved_frame_by_frame(frames)
    assert decide(frames, POLICY, THRESHOLD, expected_frames=len(frames)).reasons == ["no_liveness"]


def test_a_face_that_changes_mid_session_is_never_approved_even_without_the_blink_rule():
    no_blink_rule = SessionPolicy(margin=0.05, min_agreeing_frames=3, require_blink=False)
    frames = [stranger(0, OPEN)] + [photo_of_victim(1 + i) for i in range(3)]
    assert never_approved_frame_by_frame(frames, no_blink_rule)
    assert decide(frames, no_blink_rule, THRESHOLD, expected_frames=4).reasons == ["face_changed"]


def test_the_payers_own_blink_counts_though_the_closed_eye_frame_scores_below_the_threshold():
    frames = [photo_of_victim(i) for i in range(3)]
    frames.append(
        FrameResult(3, top_user="victim", top_score=0.85, second_score=0.5, ear=CLOSED, embedding=VICTIM_EYES_CLOSED)
    )
    frames.append(photo_of_victim(4))
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=None)
    assert verdict and verdict.approve and verdict.user_id == "victim"


def test_the_payers_own_blink_counts_on_a_frame_rejected_for_pose():
    frames = [photo_of_victim(i) for i in range(3)]
    frames.append(FrameResult(3, reason="pose_pitch", ear=CLOSED, embedding=VICTIM_EYES_CLOSED))
    frames.append(photo_of_victim(4))
    verdict = decide(frames, POLICY, THRESHOLD, expected_frames=None)
    assert verdict and verdict.approve and verdict.user_id == "victim"


# ---- end to end: real faces, every rule on ----------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_with_victim(faces, tmp_path_factory):
    """Every rule on; the victim enrolled from one photo; the selfie clip's man is not enrolled."""
    pipeline = start_pipeline(tmp_path_factory.mktemp("liveness"), SessionPolicy())
    victim_photos = faces.identities()["angelina_jolie"]
    reply = enroll(pipeline, "victim", [victim_photos[0].read_bytes()])
    assert reply.status == pb.EnrollResponse.ENROLLED, reply
    yield pipeline, victim_photos[2].read_bytes(), faces.path("video/selfie_blink.mp4")
    pipeline.stop()


@pytest.mark.slow
def test_end_to_end_a_victims_photo_then_a_stranger_blinking_is_declined(pipeline_with_victim):
    pipeline, victim_photo, stranger_clip = pipeline_with_victim
    backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
    session = new_session()
    stranger_blinks = list(video_frames(stranger_clip, max_frames=60, every=2, start=30))
    cam.stream_session(session, [victim_photo] * 3 + stranger_blinks)
    event = backend.wait_for([session])[session]
    backend.close()
    cam.close()
    assert event.decision == pb.DECLINE and list(event.reasons) == ["face_changed"], event
    assert session_state_erased(pipeline, f"store-1/{session}"), "frame embeddings outlive the decision"


def session_state_erased(pipeline, key: str, timeout_s: float = 20.0) -> bool:
    """The session's frame embeddings are biometric data: gone once the decision is written."""
    import time

    client = redis.Redis.from_url(pipeline.settings.redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not client.exists(pipeline.settings.key("session", key)):
            return True
        time.sleep(0.2)
    return False
