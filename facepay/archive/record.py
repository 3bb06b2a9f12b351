"""What an archived payment session holds, as typed dataclasses with a schema version.

The record is independent of how the pipeline fills it: the archiver stage maps its messages
onto these fields. Biometric parts (the frame as received, boxes, landmarks, pose, liveness
figures, scores, the optional embedding) live in `ArchivedFrame` and are encrypted at rest
(facepay/archive/container.py); the session's header (ids, times, the signed decision event,
model ids, threshold, policy) stays readable so that listing and auditing need no key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

RECORD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    user_id: str
    score: float  # cosine

    @staticmethod
    def top_two(scores: dict[str, Any]) -> list[Candidate]:
        """A frame's best user, then its runner-up, from what the recognizer recorded of it
        (`top_user`, `top_score`, `second_user`, `second_score`); the best only when no runner-up
        is named (an older recognizer named none), none when nobody matched."""
        if not scores.get("top_user"):
            return []
        best = Candidate(scores["top_user"], float(scores["top_score"]))
        if not scores.get("second_user"):
            return [best]
        return [best, Candidate(scores["second_user"], float(scores.get("second_score", -1.0)))]


@dataclass(frozen=True)
class ArchivedFrame:
    """One frame as received and what every stage said about it."""

    index: int  # the camera's frame number within the session
    received_ms: int  # the gateway's clock: the frame-age bound and latency are measured from it
    image: bytes  # the bytes the camera sent (JPEG/PNG), unchanged
    image_format: str
    captured_ms: int = 0  # the camera's clock, as it sent it
    phone_suffix: str = ""  # what the point of sale gave: the gallery search was filtered by it
    # detector
    face_box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in image pixels
    face_points: list[tuple[float, float]] | None = None  # 5 points
    detector_score: float | None = None
    faces_in_frame: int | None = None  # more than one: the detector told the payer from bystanders
    # aligner
    landmarks: list[tuple[float, float]] | None = None  # 68 iBUG points
    eye_aspect_ratio: float | None = None
    liveness: dict[str, float] = field(default_factory=dict)  # passive anti-spoof figures by model
    # pose
    pitch: float | None = None
    yaw: float | None = None
    roll: float | None = None
    eligible: bool | None = None
    # recognizer: the best user, then the runner-up when the search found one. Sessions archived
    # before the runner-up was named hold the best user only (same schema: a list either way).
    top_k: list[Candidate] = field(default_factory=list)
    second_score: float | None = None  # best score of anyone else: the margin rule reads top − second
    embedding: list[float] | None = None  # only when the archive is configured to keep it
    rejection: str | None = None  # why this frame was left out (no_face, pose_yaw, …)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ArchivedFrame:
        data = dict(data)
        data["top_k"] = [Candidate(**c) for c in data.get("top_k", [])]
        if data.get("face_box") is not None:
            data["face_box"] = tuple(data["face_box"])
        for name in ("face_points", "landmarks"):
            if data.get(name) is not None:
                data[name] = [tuple(p) for p in data[name]]
        return cls(**data)


@dataclass(frozen=True)
class SignedDecision:
    """The decision event exactly as the recognizer emitted it: canonical JSON, HMAC, key id."""

    payload: bytes
    signature: str
    key_id: str

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.payload)


@dataclass(frozen=True)
class ArchivedSession:
    session_id: str
    tenant: str
    store: str
    camera: str
    first_frame_ms: int
    decided_ms: int
    decision: SignedDecision
    models: dict[str, str]  # stage → model id and version in force
    threshold: float
    policy: dict[str, Any]  # the session rule in force (SessionPolicy fields)
    frames: list[ArchivedFrame]
    schema_version: int = RECORD_SCHEMA_VERSION
    frame_count: int | None = None  # the count the camera announced (SessionEnd), None if it never did

    @property
    def user_id(self) -> str | None:
        """The approved user, from the signed event (declines name nobody)."""
        return self.decision.fields.get("user_id") or None

    def header(self) -> dict[str, Any]:
        """Everything but the frames: stored in the clear, covered by the content hash."""
        return {
            "schema_version": self.schema_version,
            "session_id": self.session_id,
            "tenant": self.tenant,
            "store": self.store,
            "camera": self.camera,
            "first_frame_ms": self.first_frame_ms,
            "decided_ms": self.decided_ms,
            "decision": {
                "payload": self.decision.payload,
                "signature": self.decision.signature,
                "key_id": self.decision.key_id,
            },
            "models": self.models,
            "threshold": self.threshold,
            "policy": self.policy,
            "frame_count": self.frame_count,
        }

    @classmethod
    def from_header(cls, header: dict[str, Any], frames: list[ArchivedFrame]) -> ArchivedSession:
        fields_ = dict(header)
        fields_["decision"] = SignedDecision(**fields_["decision"])
        return cls(frames=frames, **fields_)
