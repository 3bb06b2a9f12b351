"""Passive per-frame anti-spoof hints from two small TF.js models, run in torch.

- **antispoof** (Kaggle "fake-face detection" CNN): 128×128 RGB scaled to 0..1, sigmoid output
  read as P(real). Its training data were real vs. *edited* photos, not presentation attacks.
- **liveness** (LivenessNet, leokwu/livenessnet): 32×32 scaled to 0..1 in **BGR** order (its
  training read images with cv2.imread), softmax over ["fake", "real"] (scikit-learn's
  LabelEncoder on the folder names, so index 1 is "real"). human reads index 0 of an RGB input
  instead; on real faces that reads ~0.99, but it is the "fake" unit of colour-swapped input.

Both see the detector box's square (1.0× its longer side) rolled upright by the eye line, and
are weak hints at best: blink over frames stays the real liveness signal. Neither was checked
on spoofs here (the dev data has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from facepay.models.tfjs import load_registered
from services.aligner.facemesh import Box, FaceSquare, check_face_inputs, run_batched, squares_for, warp_square

BOX_SCALE = 1.0
ANTISPOOF_SIZE = 128
LIVENESS_SIZE = 32
LIVENESS_REAL_INDEX = 1


class LivenessScores(NamedTuple):
    antispoof: float  # P(real photo), 0..1
    liveness: float  # P(real), 0..1


class PassiveLiveness:
    """antispoof and liveness scores per face crop, batched; CPU or CUDA (fp16)."""

    model_id = "antispoof-kaggle+livenessnet"

    def __init__(self, device: str | torch.device = "auto", max_batch: int = 64) -> None:
        self._antispoof = load_registered("antispoof", device)
        self._liveness = load_registered("liveness", device)
        self.max_batch = max_batch

    @property
    def device(self) -> torch.device:
        return self._antispoof.device

    def predict(
        self, crops: Sequence[np.ndarray], boxes: Sequence[Box], points5: Sequence[np.ndarray] | None = None
    ) -> list[LivenessScores]:
        """Per (RGB uint8 crop, face box in crop pixels[, detector five points])."""
        check_face_inputs(crops, boxes, points5)
        return self.predict_squares(crops, squares_for(boxes, points5, BOX_SCALE))

    def predict_squares(self, crops: Sequence[np.ndarray], squares: Sequence[FaceSquare]) -> list[LivenessScores]:
        if not crops:
            return []
        rgb = (
            np.stack([warp_square(c, s, ANTISPOOF_SIZE) for c, s in zip(crops, squares, strict=True)]).astype(
                np.float32
            )
            / 255.0
        )
        spoof = run_batched(self._antispoof, rgb, self.max_batch)
        (spoof_out,) = spoof.values()
        bgr = np.stack([warp_square(c, s, LIVENESS_SIZE)[..., ::-1] for c, s in zip(crops, squares, strict=True)])
        live = run_batched(self._liveness, bgr.astype(np.float32) / 255.0, self.max_batch)
        (live_out,) = live.values()
        return [
            LivenessScores(float(np.clip(a, 0.0, 1.0)), float(np.clip(v[LIVENESS_REAL_INDEX], 0.0, 1.0)))
            for a, v in zip(spoof_out.reshape(-1), live_out, strict=True)
        ]
