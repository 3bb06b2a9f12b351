"""Aligner: dense landmarks on the payer's face, a similarity transform to the aligned chips
the recognizer needs (the ArcFace 112×112 template; dlib's 150×150 chip for its ResNet), and
each eye's aspect ratio for blink liveness over the frames of the session.
"""

from __future__ import annotations

from facepay.config import Settings
from facepay.images import decode_trusted, encode_png
from facepay.messages import AlignedMsg, FaceMsg, Message
from facepay.models.device import resolve_device
from facepay.runtime.stage import PipeStage
from services.aligner.geometry import align_face, eye_aspect_ratio, five_points_from_68
from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip


class AlignerStage(PipeStage):
    name = "aligner"
    input = "faces"
    output = "aligned"
    accepts = FaceMsg

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self) -> None:
        self.model = DlibLandmarks68(device=resolve_device(self.settings.device))

    def handle(self, batch: list[FaceMsg]) -> list[Message]:
        crops = [decode_trusted(face.crop) for face in batch]
        all_landmarks = self.model.predict(crops, [face.box for face in batch])
        return [self._aligned(face, crop, lm) for face, crop, lm in zip(batch, crops, all_landmarks)]

    def _aligned(self, face: FaceMsg, crop, landmarks) -> AlignedMsg:
        chips = {
            "arcface112": encode_png(align_face(crop, five_points_from_68(landmarks))),
            "dlib150": encode_png(dlib_face_chip(crop, landmarks)),
        }
        return AlignedMsg(
            ref=face.ref,
            landmarks=landmarks.tolist(),
            crop_size=(crop.shape[1], crop.shape[0]),
            chips=chips,
            ear=tuple(float(e) for e in eye_aspect_ratio(landmarks)),
            frame_box=face.frame_box,
            det_score=face.score,
            models={**face.models, "landmarks": self.model.model_id},
        )
