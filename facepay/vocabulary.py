"""The words sessions are decided in, typed: reason codes, decisions, purposes, enrollment statuses.

Each is a `StrEnum`, so a member *is* its lower-case wire string: msgpack, JSON (the signed
event), Redis and logs carry the same bytes as a bare string did, and a string read back from
the wire compares equal to its member. Code produces and compares members, never literals.

`Reason`, `Decision` and `EnrollmentStatus` mirror the public contract's enums
(`proto/facepay/v1/facepay.proto`: `Reason`, `Decision`, `EnrollResponse.Status`), lower-cased;
tests/test_vocabulary.py checks them against the generated descriptor, so neither can drift.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a frame cannot vote, or the rule that decided a session (`matched` when approved)."""

    # A frame: the detector, aligner and pose gate, and the enrollment quality gate.
    UNREADABLE_IMAGE = "unreadable_image"
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"  # two faces too close in size and position to tell the payer
    FACE_TOO_SMALL = "face_too_small"
    POSE_YAW = "pose_yaw"
    POSE_PITCH = "pose_pitch"
    POSE_ROLL = "pose_roll"
    LANDMARKS_FAILED = "landmarks_failed"
    BLURRY = "blurry"  # enrollment: not sharp enough
    SPOOF_SUSPECTED = "spoof_suspected"  # passive anti-spoof score below its gate
    # A session: the rule that decided it.
    NOT_FRONTAL = "not_frontal"
    NO_LIVENESS = "no_liveness"
    UNKNOWN_FACE = "unknown_face"
    AMBIGUOUS_MATCH = "ambiguous_match"
    TOO_FEW_FRAMES = "too_few_frames"
    TIMEOUT = "timeout"
    MATCHED = "matched"  # the rule that approved
    LOCKED_OUT = "locked_out"  # too many consecutive failures for this camera or user
    FACE_CHANGED = "face_changed"
    UNREADABLE_STATE = "unreadable_state"  # the session's stored state could not be read


# The pose gate's reasons: a session whose every frame was one of these declines `not_frontal`.
POSE_REASONS = frozenset({Reason.POSE_YAW, Reason.POSE_PITCH, Reason.POSE_ROLL})


class Decision(StrEnum):
    APPROVE = "approve"
    DECLINE = "decline"


class Purpose(StrEnum):
    """What a session is for; it travels in every frame's `FrameRef` (and the gateway attests it)."""

    PAY = "pay"
    ENROLL = "enroll"


class EnrollmentStatus(StrEnum):
    ENROLLED = "enrolled"
    REJECTED = "rejected"  # no photo passed the quality gates (or the enrollment was incomplete)
    DUPLICATE = "duplicate"  # the face already matches another user: flagged, not merged
