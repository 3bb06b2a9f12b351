"""The pipeline's own models in one process, for still images: calibration, enrollment tools.

`FaceEmbedder` runs what the detector, aligner, pose and recognizer stages run, in the same
order and with the same settings, on an RGB array instead of a stream of messages: the
detector (`settings.detector_model`, built by the stage's `load_detector`) → `choose_payer` →
the detector's `crop_payer` (margin, JPEG round trip, as the aligner gets it) → the aligner's
`load_landmarks` (`settings.landmarks_model`: facemesh or dlib68) → its `aligned_chips`, of which
the one the recognizer reads → `head_pose` and `PoseGate.of(settings.pose)` → the recognizer's
embedder. Each step is the stage's own function, not a copy of it, so a score measured offline
is the score the pipeline computes for the same photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facepay.config import Settings
from facepay.images import decode_trusted
from facepay.models.device import resolve_device
from facepay.vocabulary import Reason
from services.aligner.geometry import aligned_chips, chip_sharpness
from services.aligner.stage import load_landmarks
from services.detector.crop import crop_payer
from services.detector.detectors import load_detector
from services.detector.mtcnn import DetectedFace
from services.detector.payer import PayerRule, choose_payer, rule_for
from services.pose.headpose import HeadPose, PoseGate, head_pose
from services.recognizer.embedder import load_embedder


@dataclass(frozen=True)
class EmbeddedFace:
    """The payer's face in one image: its embedding and the facts quality gates look at."""

    embedding: np.ndarray  # (dim,) float32, L2-normalised: cosine = dot product
    pose: HeadPose  # degrees, relative to the line of sight (as the pose stage computes it)
    pose_reason: str  # "" when the pose stage would let it be identified, else pose_yaw/…
    face_px: float  # detector box width in image pixels
    sharpness: float  # as the enrollment gate reads it (`chip_sharpness`; higher = sharper)
    det_score: float
    faces_in_image: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    most_central: bool = False  # labelled mode: the payer rule refused (multiple_faces); centre taken


@dataclass(frozen=True)
class Rejected:
    """No usable face: the detector stage's reason code (no_face, multiple_faces, …)."""

    reason: str
    detail: str = ""


class FaceEmbedder:
    """Load the models once; then `embed_image(rgb)` or `embed_images([rgb, ...])` (batched)."""

    def __init__(self, settings: Settings | None = None, enrolling: bool = False, labelled: bool = False) -> None:
        self.settings = settings or Settings()
        self.enrolling = enrolling  # enrollment's stricter rule: no other face in the picture
        # Labelled photo sets (LFW: "the person is the face nearest the centre"): where the
        # payer rule cannot tell two faces apart, take the most central one instead of refusing.
        self.labelled = labelled
        self.pose_gate = PoseGate.of(self.settings.pose)
        device = resolve_device(self.settings.device)
        self.detector = load_detector(self.settings.detector_model, device, self.settings.min_face_px)
        self.rule = rule_for(self.detector, self.settings.min_face_px)
        self.landmarks = load_landmarks(self.settings.landmarks_model, self.settings.device)
        self.embedder = load_embedder(self.settings.recognizer_model, self.settings.device)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def setup(self) -> str:
        """What decides the vectors, beyond the model ids (the embedding cache's key)."""
        return (
            f"{self.model_ids}|min_face_px={self.settings.min_face_px}|enrolling={self.enrolling}"
            f"|labelled={self.labelled}"
        )

    @property
    def model_ids(self) -> dict[str, str]:
        return {
            "detector": self.detector.model_id,
            "landmarks": self.landmarks.model_id,
            "pose": "pnp-68",
            "recognizer": self.embedder.model_id,
            "chip": self.embedder.chip_template,
        }

    def embed_image(self, rgb: np.ndarray) -> EmbeddedFace | Rejected:
        return self.embed_images([rgb])[0]

    def embed_images(self, images: Sequence[np.ndarray]) -> list[EmbeddedFace | Rejected]:
        """One result per image, in order; one detector, landmarks and embedder pass per call."""
        out: list[EmbeddedFace | Rejected | None] = [None] * len(images)
        found: list[tuple[int, DetectedFace, bool, int]] = []
        crops, boxes, points5 = [], [], []
        for i, (image, faces) in enumerate(zip(images, self.detector.detect(list(images)), strict=True)):
            h, w = image.shape[:2]
            payer, reason = choose_payer(faces, w, h, self.rule, enrolling=self.enrolling)
            central = payer is None and reason == Reason.MULTIPLE_FACES and self.labelled
            if central:
                payer, reason = _most_central(faces, w, h, self.rule)
            if payer is None:
                out[i] = Rejected(reason, f"{len(faces)} faces found")
                continue
            payer_crop = crop_payer(image, payer)
            found.append((i, payer, central, len(faces)))
            crops.append(decode_trusted(payer_crop.jpeg))  # as the aligner reads the detector's FaceMsg
            boxes.append(payer_crop.box)
            points5.append(np.asarray(payer_crop.points5, dtype=np.float32))
        landmarks = self.landmarks.predict(crops, boxes, points5) if crops else []
        chips = [aligned_chips(crop, lm) for crop, lm in zip(crops, landmarks, strict=True)]
        vectors = self.embedder.embed([c[self.embedder.chip_template] for c in chips])
        for (i, payer, central, n_faces), crop, lm, face_chips, vector in zip(
            found, crops, landmarks, chips, vectors, strict=True
        ):
            pose = head_pose(lm, (crop.shape[1], crop.shape[0]))
            x1, y1, x2, y2 = (float(v) for v in payer.box)
            out[i] = EmbeddedFace(
                embedding=np.asarray(vector, dtype=np.float32),
                pose=pose,
                pose_reason=self.pose_gate.check(pose) or "",
                face_px=x2 - x1,
                sharpness=chip_sharpness(face_chips),
                det_score=float(payer.score),
                faces_in_image=n_faces,
                box=(x1, y1, x2, y2),
                most_central=central,
            )
        return out  # type: ignore[return-value]


def _most_central(faces: list[DetectedFace], w: int, h: int, rule: PayerRule) -> tuple[DetectedFace | None, str]:
    confident = [f for f in faces if f.score >= rule.min_score]
    face = min(confident, key=lambda f: (f.box[0] + f.box[2] - w) ** 2 + (f.box[1] + f.box[3] - h) ** 2)
    return (face, "") if face.box[2] - face.box[0] >= rule.min_face_px else (None, Reason.FACE_TOO_SMALL)
