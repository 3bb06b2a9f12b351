"""HSE FaceRes's input convention, for both its uses: the aligner's age and gender heads and the
recognizer's FaceRes embedder read the same network (`load_registered("faceres")`)."""

from __future__ import annotations

import numpy as np

CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def faceres_input(chips_rgb: np.ndarray) -> np.ndarray:
    """(N, 224, 224, 3) uint8 RGB → the float32 BGR − mean the HSE network was trained on."""
    return np.ascontiguousarray(chips_rgb[..., ::-1].astype(np.float32) - CAFFE_BGR_MEAN)
