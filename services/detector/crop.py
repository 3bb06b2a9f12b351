"""The crop around the payer's face that the detector passes on, and what it carries along.

One function for the detector stage and the offline tools (`facepay.app.offline`), so a score
measured offline is computed on the very crop the pipeline's aligner gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facepay.images import encode_jpeg
from services.detector.mtcnn import DetectedFace

CROP_MARGIN = 0.4  # of the box size on each side: context the landmark model needs


@dataclass(frozen=True)
class PayerCrop:
    """The payer's face cut from the frame: JPEG bytes, and the box and points in crop pixels."""

    jpeg: bytes
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the crop
    points5: list[list[float]]  # the detector's five points, in the crop
    offset: tuple[int, int]  # the crop's top-left corner in the frame


def crop_payer(image: np.ndarray, face: DetectedFace) -> PayerCrop:
    """`face` with `CROP_MARGIN` of context on each side (clipped to the frame), JPEG-encoded."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = face.box
    mx, my = (x2 - x1) * CROP_MARGIN, (y2 - y1) * CROP_MARGIN
    cx1, cy1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
    cx2, cy2 = int(min(w, x2 + mx)), int(min(h, y2 + my))
    return PayerCrop(
        jpeg=encode_jpeg(np.ascontiguousarray(image[cy1:cy2, cx1:cx2])),
        box=(x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1),
        points5=[[float(px - cx1), float(py - cy1)] for px, py in face.points5],
        offset=(cx1, cy1),
    )
