"""128-d face embeddings from dlib's ResNet (dlib_face_recognition_resnet_model_v1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dlib
import numpy as np
import torch

from facepay.models.base import NormalisedEmbeddings, check_chips
from facepay.models.cache import weight_path
from facepay.models.device import dlib_cpu_device

WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"


class DlibResNetEmbedder(NormalisedEmbeddings):
    """Unit-length 128-d descriptors of 150×150 chips made by `dlib_face_chip`.

    dlib trained this model for Euclidean distance on its raw vectors (same person below
    ~0.6), and those are *not* unit length (norms ≈ 1.3–1.65 on real faces), so 0.6 does not
    translate to a fixed cosine. `embed` L2-normalises so that the gallery can use cosine
    similarity as a plain dot product, like every other embedder in facepay; `embed_raw` keeps
    dlib's native space for comparison with dlib's published thresholds.
    """

    model_id = "dlib-resnet-v1"
    dim = 128
    chip_size = 150
    chip_template = "dlib150"  # the aligner's chip this model reads
    # Cosine threshold until `facepay calibrate` stores one: FAR ≤ 1e-4 per comparison (80 %
    # upper bound, FIDO's figure) over 3.1 M LFW impostor pairs, FRR 21.5 % per comparison
    # (facemesh-aligned chips; the session votes over frames). dlib's Euclidean 0.6 ≈ cosine 0.92.
    default_threshold = 0.943  # = facepay.models.registry.RECOGNIZERS["dlib-resnet-v1"].threshold

    def __init__(self, device: str | torch.device = "cpu", weights: Path | None = None) -> None:
        self._device = dlib_cpu_device(device)
        self._model = dlib.face_recognition_model_v1(str(weights or weight_path(WEIGHTS)))

    @property
    def device(self) -> torch.device:
        return self._device

    def embed_raw(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 128) float32 descriptors exactly as dlib returns them (not normalised)."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        check_chips(chips, self.chip_size)
        batch = [np.ascontiguousarray(chip) for chip in chips]
        # The batch overload (list of aligned chips) runs the network once over all of them.
        return np.array([np.asarray(v) for v in self._model.compute_face_descriptor(batch)], dtype=np.float32)


def load_embedder(name: str, device: str = "auto"):
    """The recognizer's embedding model by id, or a user's own by path (`onnx:/m.onnx`,
    `torchscript:/m.pt`; see services/recognizer/byo.py).

    "dlib-resnet-v1" runs dlib's weights in the torch port (batched, CUDA-capable, ~8 ms per
    face on one core); dlib-bin itself (`DlibResNetEmbedder` above) stays as the reference
    the tests compare it with. Same weights, same vectors, so the model id is the same.
    """
    from services.recognizer.arcface import ArcFaceMbfEmbedder
    from services.recognizer.byo import is_byo_spec, load_byo
    from services.recognizer.dlib_resnet_torch import DlibResNetTorchEmbedder
    from services.recognizer.faceres import FaceResEmbedder

    if is_byo_spec(name):  # byo.py's own parser, so the spec reads the same everywhere
        return load_byo(name, device)
    embedders: dict[str, type[DlibResNetTorchEmbedder | FaceResEmbedder | ArcFaceMbfEmbedder]] = {
        cls.model_id: cls for cls in (DlibResNetTorchEmbedder, FaceResEmbedder)
    }
    embedders["arcface-mbf-w600k"] = ArcFaceMbfEmbedder  # its model_id is set per instance (an OnnxEmbedder)
    if name not in embedders:
        raise ValueError(f"unknown recognizer model {name!r}; known: {', '.join(embedders)}")
    return embedders[name](device=device)


def template_space(recognizer_model_id: str, landmarks_model: str) -> str:
    """Gallery collections and calibrated thresholds are keyed by this: the same recognizer
    fed chips aligned by other landmarks gives vectors that differ enough to need their own
    threshold (measured: 0.9538 with facemesh vs 0.9553 with dlib68 at FAR 1e-5 on LFW)."""
    return f"{recognizer_model_id}+{landmarks_model}"
