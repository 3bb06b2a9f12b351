"""The pieces of `facepay demo --enroll DIR --camera PATH` that a newcomer with their own photos and
videos meets, without starting the pipeline: what is read, what is said, which rules run."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest

from facepay.app.camera import UnreadableMedia
from facepay.app.demo import build_script, describe_rules, enrollment_report
from facepay.config import SessionPolicy
from facepay.contract import pb


def args(enroll=None, camera=None, relax_liveness=False) -> argparse.Namespace:
    return argparse.Namespace(
        enroll=enroll and str(enroll), camera=camera and [str(c) for c in camera], relax_liveness=relax_liveness
    )


def own_data(tmp_path):
    """alice/ with two photos and a .webm recording of the counter."""
    for name in ("1.jpg", "2.webp"):
        (tmp_path / "people" / "alice").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "people" / "alice" / name), np.full((64, 64, 3), 128, np.uint8))
    writer = cv2.VideoWriter(str(tmp_path / "counter.webm"), cv2.VideoWriter_fourcc(*"VP80"), 12, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    return tmp_path / "people", tmp_path / "counter.webm"


def test_own_photos_and_a_webm_recording_become_enrollments_and_a_session_of_its_frames(tmp_path):
    people, video = own_data(tmp_path)
    script = build_script(args(people, [video]))
    assert [name for name, _ in script.enroll["alice"]] == ["1.jpg", "2.webp"]
    (session,) = script.sessions
    assert len(session.frames) == 10 and "counter.webm" in session.name


def test_own_sessions_run_every_rule_unless_liveness_is_relaxed_by_a_flag(tmp_path):
    people, video = own_data(tmp_path)
    assert build_script(args(people, [video])).relax_liveness is False
    assert build_script(args(people, [video], relax_liveness=True)).relax_liveness is True


def test_an_unreadable_file_of_ones_own_is_a_clear_error_before_anything_starts(tmp_path):
    people, _ = own_data(tmp_path)
    (tmp_path / "notes.webm").write_text("not a video")
    with pytest.raises(UnreadableMedia, match=r"notes.webm"):
        build_script(args(people, [tmp_path / "notes.webm"]))


def test_a_person_folder_without_photos_is_a_clear_error(tmp_path):
    (tmp_path / "people" / "bob").mkdir(parents=True)
    with pytest.raises(UnreadableMedia, match=r"bob.*no photo"):
        build_script(args(tmp_path / "people"))


def test_a_rejected_enrollment_says_why_for_each_photo():
    reply = pb.EnrollResponse(
        user_id="alice",
        status=pb.EnrollResponse.REJECTED,
        images=[
            pb.ImageVerdict(index=0, accepted=False, reason=pb.POSE_ROLL, detail="pose_roll"),
            pb.ImageVerdict(index=1, accepted=False, reason=pb.FACE_TOO_SMALL, detail="face_too_small"),
        ],
    )
    lines = enrollment_report("alice", ["IMG_1.jpg", "IMG_2.jpg"], reply, seconds=1.2)
    assert lines[0].startswith("enroll alice") and "REJECTED" in lines[0] and "0/2 images accepted" in lines[0]
    assert "IMG_1.jpg" in lines[1] and "pose_roll" in lines[1]
    assert "IMG_2.jpg" in lines[2] and "face_too_small" in lines[2]


def test_an_accepted_enrollment_is_one_line_and_a_duplicate_names_the_other_user():
    ok = pb.EnrollResponse(
        user_id="a", status=pb.EnrollResponse.ENROLLED, images=[pb.ImageVerdict(index=0, accepted=True)]
    )
    assert len(enrollment_report("a", ["1.jpg"], ok, seconds=0.5)) == 1
    duplicate = pb.EnrollResponse(
        user_id="b",
        status=pb.EnrollResponse.DUPLICATE,
        duplicate_of="a",
        duplicate_score=0.97,
        images=[pb.ImageVerdict(index=0, accepted=True)],
    )
    assert "already enrolled as a" in enrollment_report("b", ["1.jpg"], duplicate, seconds=0.5)[0]


def test_the_rules_of_a_session_are_named_and_a_relaxed_one_says_so():
    assert describe_rules(SessionPolicy()) == "rules: 2 agreeing frames, margin 0.02, blink"  # dlib's defaults
    assert (
        describe_rules(SessionPolicy(margin=0.05, min_agreeing_frames=3))
        == "rules: 3 agreeing frames, margin 0.05, blink"
    )
    assert describe_rules(SessionPolicy(), "arcface-mbf-w600k") == "rules: 1 agreeing frames, margin 0.15, blink"
    assert describe_rules(SessionPolicy(require_blink=False)) == "rules: 2 agreeing frames, margin 0.02, blink RELAXED"
    assert describe_rules(SessionPolicy(min_passive_liveness=0.5)).endswith("blink, anti-spoof ≥ 0.5")
