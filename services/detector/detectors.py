"""The face detectors the detector stage can run, behind one interface, chosen by name.

Every detector takes a batch of RGB uint8 images and returns, per image, `DetectedFace`s
(box, score, five points: image-left eye, image-right eye, nose, mouth corners) best first,
in the image's own pixels. `payer_min_score` is the confidence at which the payer rule takes
a face: scores are each model's own, not comparable across models.

`FACEPAY_DETECTOR_MODEL` (`Settings.detector_model`) names one; the detector stage and the
offline tools (`facepay.app.offline.FaceEmbedder`) both build it with `load_detector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from services.detector.mtcnn import DetectedFace


class FaceDetector(Protocol):
    model_id: str
    licence: str
    payer_min_score: float

    @property
    def device(self) -> torch.device: ...

    def detect(self, images: list[np.ndarray]) -> list[list[DetectedFace]]: ...


def _mtcnn(device: torch.device | str, min_face_size: int) -> FaceDetector:
    from services.detector.mtcnn import MTCNN

    return MTCNN(device=device, min_face_size=min_face_size)


def _scrfd(device: torch.device | str, min_face_size: int, input_size: int | None = None) -> FaceDetector:
    from services.detector.scrfd import DEFAULT_INPUT_SIZE, SCRFD

    return SCRFD(device=device, min_face_size=min_face_size, input_size=input_size or DEFAULT_INPUT_SIZE)


def _blazeface(variant: str) -> Callable[[torch.device | str, int], FaceDetector]:
    def build(device: torch.device | str, min_face_size: int) -> FaceDetector:
        from services.detector.blazeface import BlazeFace

        return BlazeFace(device=device, min_face_size=min_face_size, variant=variant)

    return build


DETECTORS: dict[str, Callable[[torch.device | str, int], FaceDetector]] = {
    "mtcnn": _mtcnn,
    "scrfd-500m": _scrfd,
    "blazeface": _blazeface("front"),
    "blazeface-back": _blazeface("back"),
}


def load_detector(name: str, device: torch.device | str = "cpu", min_face_size: int = 20) -> FaceDetector:
    """The detector called `name` (a key of DETECTORS), loaded on `device`.

    `scrfd-500m@640` sets SCRFD's input size (the longer side, a multiple of 32).
    """
    base, _, size = name.partition("@")
    if base == "scrfd-500m" and size:
        if not size.isdigit():
            raise ValueError(f"detector model {name!r}: the input size after '@' must be a number of pixels")
        return _scrfd(device, min_face_size, int(size))
    if name not in DETECTORS:
        raise ValueError(f"unknown detector model {name!r}; known: {', '.join(DETECTORS)} (and scrfd-500m@SIZE)")
    return DETECTORS[name](device, min_face_size)
