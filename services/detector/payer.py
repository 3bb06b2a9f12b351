"""Which face is paying: the most prominent one (large and central), if it can be told apart."""

from __future__ import annotations

from dataclasses import dataclass

from facepay.vocabulary import Reason
from services.detector.mtcnn import DetectedFace


@dataclass(frozen=True)
class PayerRule:
    min_score: float = 0.9  # detector confidence below this is not a face to pay with
    min_face_px: int = 40  # narrower than this is too small to identify reliably
    ambiguity_ratio: float = 0.8  # a second face this prominent: cannot tell who pays
    background_ratio: float = 0.25  # enrollment: any other face above this × the main one's area


def prominence(face: DetectedFace, frame_w: int, frame_h: int) -> float:
    """Box area, discounted up to half as the box centre moves from the frame centre to a corner."""
    x1, y1, x2, y2 = face.box
    cx, cy = (x1 + x2) / 2 - frame_w / 2, (y1 + y2) / 2 - frame_h / 2
    off_centre = (cx**2 + cy**2) ** 0.5 / ((frame_w**2 + frame_h**2) ** 0.5 / 2)
    return (x2 - x1) * (y2 - y1) * (1.0 - 0.5 * min(off_centre, 1.0))


def choose_payer(
    faces: list[DetectedFace], frame_w: int, frame_h: int, rule: PayerRule, enrolling: bool = False
) -> tuple[DetectedFace | None, str]:
    """(face, "") or (None, reason code) — no_face, face_too_small, multiple_faces."""
    faces = [f for f in faces if f.score >= rule.min_score]
    if not faces:
        return None, Reason.NO_FACE
    ranked = sorted(faces, key=lambda f: prominence(f, frame_w, frame_h), reverse=True)
    best = ranked[0]
    if len(ranked) > 1:
        ratio = prominence(ranked[1], frame_w, frame_h) / prominence(best, frame_w, frame_h)
        if ratio >= (rule.background_ratio if enrolling else rule.ambiguity_ratio):
            return None, Reason.MULTIPLE_FACES
    if best.box[2] - best.box[0] < rule.min_face_px:
        return None, Reason.FACE_TOO_SMALL
    return best, ""
