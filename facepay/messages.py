"""Typed, versioned messages between stages, msgpack-encoded as one Redis stream field `m`.

Every message carries the `FrameRef` of the camera frame it derives from, so any stage (and
an auditor) can tell which session, camera and frame it belongs to. A frame yields exactly one
message per stage: a result, or a `Rejection` that flows on downstream (the recognizer needs
"no face in 20 frames" to decline honestly). `SessionEnd` markers pass through every stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from facepay.vocabulary import Purpose, Reason

SCHEMA_VERSION = 1
FIELD = b"m"  # the stream entry field that holds the encoded message


class MalformedMessage(ValueError):
    """Not a facepay message (bad msgpack, unknown type or version): goes to dead letters."""


@dataclass(frozen=True)
class FrameRef:
    session_id: str
    store_id: str
    camera_id: str
    sequence: int
    captured_ms: int
    purpose: Purpose = Purpose.PAY  # decoded from the wire as its plain string, equal to the member
    user_id: str = ""  # enroll: the user being enrolled
    tenant_id: str = ""  # gallery partition the session searches / writes
    phone_suffix: str = ""
    trace_id: str = ""
    received_ms: int = 0  # gateway clock, for frame-to-decision latency
    # The gateway's attestation of the frame's origin (facepay/runtime/envelope.py): the image's
    # sha256 and the gateway's Ed25519 signature over every other field of this ref.
    image_sha256: str = ""
    origin_sig: str = ""


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    ref: FrameRef

    def encode(self) -> bytes:
        body = {k: _plain(v) for k, v in asdict(self).items() if k != "ref"}
        return msgpack.packb({"v": SCHEMA_VERSION, "t": self.TYPE, "ref": asdict(self.ref), **body})


@dataclass(frozen=True)
class FrameMsg(Message):
    """gateway → detector: one encoded camera image."""

    TYPE: ClassVar[str] = "frame"
    image: bytes = b""


@dataclass(frozen=True)
class SessionEndMsg(Message):
    """The camera says how many frames the session has (`ref.sequence` is unused)."""

    TYPE: ClassVar[str] = "end"
    frame_count: int = 0


@dataclass(frozen=True)
class FaceMsg(Message):
    """detector → aligner: the payer's face crop (not the whole frame) and where it was."""

    TYPE: ClassVar[str] = "face"
    crop: bytes = b""  # JPEG of the face with margin
    box: tuple[float, float, float, float] = (0, 0, 0, 0)  # face box in crop pixels
    points5: list[list[float]] = field(default_factory=list)  # detector's 5 points, crop pixels
    frame_box: tuple[float, float, float, float] = (0, 0, 0, 0)  # face box in frame pixels
    frame_size: tuple[int, int] = (0, 0)  # w, h
    score: float = 0.0
    faces_in_frame: int = 1
    models: dict[str, str] = field(default_factory=dict)  # stage → model id, for the event


@dataclass(frozen=True)
class AlignedMsg(Message):
    """aligner → pose: landmarks, aligned chips and per-frame eye openness."""

    TYPE: ClassVar[str] = "aligned"
    landmarks: list[list[float]] = field(default_factory=list)  # 68 points, crop pixels
    crop_size: tuple[int, int] = (0, 0)
    chips: dict[str, bytes] = field(default_factory=dict)  # template name → PNG chip
    ear: tuple[float, float] = (0.0, 0.0)  # eye aspect ratio, image-left eye first
    frame_box: tuple[float, float, float, float] = (0, 0, 0, 0)
    det_score: float = 0.0
    models: dict[str, str] = field(default_factory=dict)
    age: float | None = None  # years
    gender: str = ""  # "female" | "male" | "" (not estimated)
    gender_confidence: float = 0.0
    antispoof: float | None = None  # passive P(real), a weak per-frame hint
    liveness: float | None = None
    sharpness: float = 0.0  # variance of the Laplacian of the grey dlib150 chip


@dataclass(frozen=True)
class PosedMsg(Message):
    """pose → recognizer: the aligned face plus head pose and whether it may be identified."""

    TYPE: ClassVar[str] = "posed"
    chips: dict[str, bytes] = field(default_factory=dict)
    ear: tuple[float, float] = (0.0, 0.0)
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0
    eligible: bool = True
    reason: Reason | str = ""  # why not eligible (pose_yaw …)
    models: dict[str, str] = field(default_factory=dict)
    antispoof: float | None = None
    sharpness: float = 0.0
    face_px: float = 0.0  # face box width in the camera frame


@dataclass(frozen=True)
class Rejection(Message):
    """A frame that a stage could not pass on as a face, with a stable reason code."""

    TYPE: ClassVar[str] = "rejection"
    stage: str = ""
    reason: Reason | str = ""
    detail: str = ""


@dataclass(frozen=True)
class AdminMsg(Message):
    """operator → recognizer, the gallery's owner: a command, answered on `{ns}:admin-replies`."""

    TYPE: ClassVar[str] = "admin"
    command: str = ""  # list_users | show_user | delete_user | reset_lockout
    args: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""  # refused when seen before
    issued_at_ms: int = 0  # refused when older than admin_max_age_s


@dataclass(frozen=True)
class DecisionMsg(Message):
    """recognizer → archiver on `{ns}:decision-records`, the decision record: the event exactly
    as signed (the one backends read on `{ns}:decisions`), what the recognizer saw of each frame
    (the top-k users and scores exist nowhere else) and the session rule in force. `ref` is the
    session's. A stream of its own, written with the decision in one once-only write: a backend
    reads `{ns}:decisions` in full and has no business knowing whom a payer's face resembled.
    (Until this stream existed the message rode in the decision entry itself, field `m`; the
    message is unchanged, only where it goes.)"""

    TYPE: ClassVar[str] = "decision"
    payload: bytes = b""  # the signed event's canonical JSON
    signature: str = ""  # its HMAC-SHA256
    key_id: str = ""
    # sequence, top_user, top_score, second_user ("" from an older recognizer), second_score, reason
    frames: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingMsg(Message):
    """recognizer → archiver on `{ns}:embeddings`, only with `archive_keep_embeddings`: one
    payment face's embedding as the session rule used it. A stream of its own, not the decision
    entry: payment backends read `{ns}:decisions`, and an embedding is biometric data."""

    TYPE: ClassVar[str] = "embedding"
    vector: list[float] = field(default_factory=list)
    space: str = ""  # the template space (recognizer model + landmarks) the vector belongs to


_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (FrameMsg, SessionEndMsg, FaceMsg, AlignedMsg, PosedMsg, Rejection, AdminMsg, DecisionMsg, EmbeddingMsg)
}


def decode(raw: bytes) -> Message:
    try:
        data = msgpack.unpackb(raw, raw=False)
        version, kind = data.pop("v"), data.pop("t")
    except Exception as exc:  # any decoding failure means the same thing
        raise MalformedMessage(f"not a facepay message: {exc}") from exc
    if version != SCHEMA_VERSION or not isinstance(kind, str) or kind not in _TYPES:
        raise MalformedMessage(f"unsupported message v={version!r} t={kind!r}")
    cls = _TYPES[kind]
    try:
        ref = FrameRef(**data.pop("ref"))
        return cls(ref=ref, **{k: _tuple_if_list(cls, k, v) for k, v in data.items()})
    except (KeyError, TypeError, AttributeError) as exc:  # missing ref, unknown or mistyped field
        raise MalformedMessage(f"bad {kind} message: {exc!r}") from exc


def reject(msg: Message, stage: str, reason: Reason, detail: str = "") -> Rejection:
    return Rejection(ref=msg.ref, stage=stage, reason=reason, detail=detail)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _tuple_if_list(cls: type[Message], name: str, value: Any) -> Any:
    annotation = cls.__dataclass_fields__[name].type
    return tuple(value) if isinstance(value, list) and str(annotation).startswith("tuple") else value
