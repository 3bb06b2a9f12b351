"""Detector: find the faces in each camera frame and lock on the paying face.

Passes on a crop around that face (not the whole frame) with the box and five points; a frame
with no usable face, or with two faces too alike in prominence to tell the payer, becomes a
Rejection with its reason, so the session still counts it.
"""

from __future__ import annotations

import logging

import numpy as np

from facepay.config import Settings
from facepay.images import ImageError, decode_image
from facepay.keys import TrustedKeys
from facepay.messages import FaceMsg, FrameMsg, Message, reject
from facepay.models.device import resolve_device
from facepay.runtime.envelope import image_digest, origin_problem
from facepay.runtime.stage import PipeStage
from facepay.vocabulary import Purpose, Reason
from services.detector.crop import crop_payer
from services.detector.detectors import load_detector
from services.detector.mtcnn import DetectedFace
from services.detector.payer import PayerRule, choose_payer, rule_for

log = logging.getLogger(__name__)


class DetectorStage(PipeStage):
    name = "detector"
    input = "frames"
    output = "faces"
    accepts = FrameMsg
    accepts_from = {"frame": frozenset({"gateway"}), "end": frozenset({"gateway"})}
    uses_device = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rule = PayerRule(min_face_px=settings.min_face_px)

    def start(self) -> None:
        # Faces narrower than min_face_px cannot pay anyway: not looking for them halves the
        # pyramid's cost on a full-HD frame.
        self.model = load_detector(
            self.settings.detector_model, resolve_device(self.settings.device), self.settings.min_face_px
        )
        self.rule = rule_for(self.model, self.settings.min_face_px)
        # An operator must never run a non-commercial model without seeing so.
        level = logging.WARNING if "non-commercial" in self.model.licence else logging.INFO
        log.log(level, "detector model", extra={"model": self.model.model_id, "licence": self.model.licence})

    def refuse(self, message: Message, trusted: TrustedKeys) -> str:
        """The gateway attested the frame's origin and the image is the one it attested."""
        problem = origin_problem(message.ref, trusted)
        if not problem and isinstance(message, FrameMsg) and image_digest(message.image) != message.ref.image_sha256:
            problem = "image does not match the digest the gateway attested"
        return problem

    def handle(self, batch: list[FrameMsg]) -> list[Message]:
        decoded: list[np.ndarray | str] = [self._decode(frame) for frame in batch]
        readable = [img for img in decoded if isinstance(img, np.ndarray)]
        detections = iter(self.model.detect(readable))  # one batched call for the whole read
        return [
            self._lock_on_payer(frame, image, next(detections))
            if isinstance(image, np.ndarray)
            else reject(frame, self.name, Reason.UNREADABLE_IMAGE, image)
            for frame, image in zip(batch, decoded, strict=True)
        ]

    def _decode(self, frame: FrameMsg) -> np.ndarray | str:
        """The image, or the error text (the gateway checked it, but a replay may not have)."""
        try:
            return decode_image(frame.image, self.settings.max_image_bytes, self.settings.max_image_pixels)
        except ImageError as exc:
            return str(exc)

    def _lock_on_payer(self, frame: FrameMsg, image, faces: list[DetectedFace]) -> Message:
        h, w = image.shape[:2]
        payer, reason = choose_payer(faces, w, h, self.rule, enrolling=frame.ref.purpose == Purpose.ENROLL)
        if payer is None:
            return reject(frame, self.name, Reason(reason), f"{len(faces)} faces found")
        crop = crop_payer(image, payer)
        x1, y1, x2, y2 = payer.box
        return FaceMsg(
            ref=frame.ref,
            crop=crop.jpeg,
            box=crop.box,
            points5=crop.points5,
            frame_box=(float(x1), float(y1), float(x2), float(y2)),
            frame_size=(w, h),
            score=float(payer.score),
            faces_in_frame=len(faces),
            models={"detector": self.model.model_id},
        )
