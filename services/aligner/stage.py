"""Aligner: dense landmarks on the payer's face, a similarity transform to the aligned chips
the recognizers need (the ArcFace 112×112 template; dlib's 150×150 chip), each eye's aspect
ratio for blink liveness over the frames of the session, and per-face age, gender and
passive anti-spoof scores carried in the aligned record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facepay.config import Settings
from facepay.images import decode_trusted, encode_png
from facepay.messages import AlignedMsg, FaceMsg, Message
from facepay.runtime.stage import PipeStage
from services.aligner.geometry import aligned_chips, chip_sharpness, eye_aspect_ratio


class MeshLandmarks:
    """MediaPipe's 468-point mesh (torch, batched, GPU-ready) read as the 68 iBUG points."""

    def __init__(self, device: str) -> None:
        from services.aligner.facemesh import FaceMesh

        self.mesh = FaceMesh(device=device)
        self.model_id = self.mesh.model_id

    def predict(self, crops, boxes, points5) -> list[np.ndarray]:
        return [r.landmarks68 for r in self.mesh.predict(crops, boxes, points5)]


class DlibLandmarks:
    """dlib's 68-point predictor (CPU only; trained on iBUG 300-W: not for commercial use)."""

    def __init__(self, device: str) -> None:
        from services.aligner.landmarks import DlibLandmarks68

        self.model = DlibLandmarks68(device=device)
        self.model_id = self.model.model_id

    def predict(self, crops, boxes, points5) -> list[np.ndarray]:
        return self.model.predict(crops, boxes)


LANDMARKERS: dict[str, type[MeshLandmarks | DlibLandmarks]] = {"facemesh": MeshLandmarks, "dlib68": DlibLandmarks}


def load_landmarks(name: str, device: str) -> MeshLandmarks | DlibLandmarks:
    """The landmarks model `settings.landmarks_model` names (the aligner's, and the offline tools')."""
    if name not in LANDMARKERS:
        raise ValueError(f"unknown landmarks model {name!r}; known: {', '.join(LANDMARKERS)}")
    return LANDMARKERS[name](device)


class AlignerStage(PipeStage):
    name = "aligner"
    input = "faces"
    output = "aligned"
    accepts = FaceMsg
    accepts_from = {t: frozenset({"detector"}) for t in ("face", "rejection", "end")}
    uses_device = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self) -> None:
        device = self.settings.device
        self.landmarks = load_landmarks(self.settings.landmarks_model, device)
        self.attributes = self.liveness = None
        if self.settings.attributes_model != "off":
            from services.aligner.attributes import AgeGender

            self.attributes = AgeGender(device=device, model=self.settings.attributes_model)
        if self.settings.passive_liveness:
            from services.aligner.liveness import PassiveLiveness

            self.liveness = PassiveLiveness(device=device)

    def handle(self, batch: list[FaceMsg]) -> list[Message]:
        crops = [decode_trusted(face.crop) for face in batch]
        boxes = [face.box for face in batch]
        points5 = [np.asarray(face.points5, dtype=np.float32) for face in batch]
        landmarks = self.landmarks.predict(crops, boxes, points5)
        attributes = self.attributes.predict(crops, boxes, points5) if self.attributes else [None] * len(batch)
        liveness = self.liveness.predict(crops, boxes, points5) if self.liveness else [None] * len(batch)
        return [self._aligned(*row) for row in zip(batch, crops, landmarks, attributes, liveness, strict=True)]

    def _aligned(self, face: FaceMsg, crop, landmarks, attributes, liveness) -> AlignedMsg:
        chips = aligned_chips(crop, landmarks)
        models = {**face.models, "landmarks": self.landmarks.model_id}
        extra: dict[str, Any] = {}
        if attributes is not None and self.attributes is not None:
            models["attributes"] = self.attributes.model_id
            extra.update(
                age=round(attributes.age_years, 1),
                gender=attributes.gender,
                gender_confidence=round(attributes.gender_confidence, 3),
            )
        if liveness is not None and self.liveness is not None:
            models["passive_liveness"] = self.liveness.model_id
            extra.update(antispoof=round(liveness.antispoof, 4), liveness=round(liveness.liveness, 4))
        left_ear, right_ear = (float(e) for e in eye_aspect_ratio(landmarks))
        return AlignedMsg(
            ref=face.ref,
            landmarks=landmarks.tolist(),
            crop_size=(crop.shape[1], crop.shape[0]),
            chips={template: encode_png(chip) for template, chip in chips.items()},
            ear=(left_ear, right_ear),
            frame_box=face.frame_box,
            det_score=face.score,
            models=models,
            sharpness=chip_sharpness(chips),
            **extra,
        )
