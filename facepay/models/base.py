"""The small interface every face model in facepay keeps (a Protocol, checked in tests).

Each model is loaded from the model cache (sha256-verified) when constructed, states the
device it runs on (CUDA asked for and absent is an error, never a silent CPU run), predicts on
a batch, and has a model id with version that goes into events and keys the gallery.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class FaceModel(Protocol):
    model_id: str

    @property
    def device(self) -> torch.device: ...


@runtime_checkable
class Embedder(FaceModel, Protocol):
    """A recognizer: aligned chips of `chip_template` → L2-normalised (N, dim) float32."""

    dim: int
    chip_template: str
    default_threshold: float

    def embed(self, chips: list) -> object: ...


class NormalisedEmbeddings:
    """`embed` is the model's `embed_raw` with each row L2-normalised, so that cosine
    similarity is a plain dot product in the gallery, whatever the model's native scale."""

    def embed(self, chips) -> np.ndarray:
        raw = self.embed_raw(chips)  # type: ignore[attr-defined]
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)


def check_chips(chips, size: int) -> None:
    """Aligned chips must be size×size×3 uint8 (the aligner's output), else a clear error."""
    for chip in chips:
        if getattr(chip, "shape", None) != (size, size, 3) or chip.dtype != np.uint8:
            raise ValueError(
                f"expected {size}x{size}x3 uint8 chips from the aligner's dlib_chip, "
                f"got {getattr(chip, 'dtype', type(chip))} {getattr(chip, 'shape', None)}"
            )
