"""68-point facial landmarks from dlib's ERT shape predictor, plus dlib's own face-chip cropper."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dlib
import numpy as np
import torch

from facepay.models.cache import weight_path
from facepay.models.device import dlib_cpu_device

WEIGHTS = "shape_predictor_68_face_landmarks.dat"

# x1, y1, x2, y2 in pixels, rounded to dlib.rectangle(left, top, right, bottom). dlib treats
# right/bottom as inclusive; the predictor is sensitive even to that 1 px on small faces.
Box = tuple[float, float, float, float]


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    # dlib's pybind layer accepts only C-contiguous uint8 HxW or HxWx3 arrays.
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an HxWx3 (or HxW) uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _rect(box: Box) -> dlib.rectangle:
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    return dlib.rectangle(x1, y1, x2, y2)


class DlibLandmarks68:
    """iBUG-68 landmarks for one given face box per image (dlib shape_predictor_68)."""

    model_id = "dlib-shape-predictor-68"

    def __init__(self, device: str | torch.device = "cpu", weights: Path | None = None) -> None:
        self._device = dlib_cpu_device(device)
        self._predictor = dlib.shape_predictor(str(weights or weight_path(WEIGHTS)))

    @property
    def device(self) -> torch.device:
        return self._device

    def predict(self, images: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[np.ndarray]:
        """(68, 2) float32 (x, y) landmarks for each (image, box) pair, in iBUG 300-W order."""
        if len(images) != len(boxes):
            raise ValueError(f"one box per image: got {len(images)} images and {len(boxes)} boxes")
        out: list[np.ndarray] = []
        for image, box in zip(images, boxes, strict=True):
            shape = self._predictor(_as_rgb_uint8(image), _rect(box))
            out.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32))
        return out


def dlib_face_chip(
    image_rgb: np.ndarray, landmarks68: np.ndarray, size: int = 150, padding: float = 0.25
) -> np.ndarray:
    """The size×size RGB chip dlib's face-recognition ResNet was trained on.

    dlib aligns with its own landmark template and padding, which differs from ARCFACE_112;
    feeding the ResNet anything else costs accuracy, hence this separate cropper.
    """
    pts = np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)
    # dlib.point is integer-valued; the predictor's own output is integer too, so rounding
    # loses nothing for dlib landmarks and at most half a pixel for others.
    parts = dlib.points([dlib.point(round(x), round(y)) for x, y in pts])
    x1, y1 = np.floor(pts.min(axis=0)).astype(int)
    x2, y2 = np.ceil(pts.max(axis=0)).astype(int)
    detection = dlib.full_object_detection(dlib.rectangle(int(x1), int(y1), int(x2), int(y2)), parts)
    return np.asarray(dlib.get_face_chip(_as_rgb_uint8(image_rgb), detection, size=size, padding=padding))
