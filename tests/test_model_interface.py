"""Every model keeps the one small interface: model id, device, batched prediction."""

from __future__ import annotations

import pytest

from facepay.models.base import Embedder, FaceModel

MODELS = {
    "mtcnn": lambda: __import__("services.detector.mtcnn", fromlist=["MTCNN"]).MTCNN(device="cpu"),
    "facemesh": lambda: __import__("services.aligner.facemesh", fromlist=["FaceMesh"]).FaceMesh(device="cpu"),
    "dlib68": lambda: __import__("services.aligner.landmarks", fromlist=["x"]).DlibLandmarks68(device="cpu"),
    "faceres-attributes": lambda: __import__("services.aligner.attributes", fromlist=["x"]).AgeGender(device="cpu"),
    "passive-liveness": lambda: __import__("services.aligner.liveness", fromlist=["x"]).PassiveLiveness(device="cpu"),
}
EMBEDDERS = ["dlib-resnet-v1", "faceres-hse-v1"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_states_its_id_and_device(name):
    model = MODELS[name]()
    assert isinstance(model, FaceModel) and model.model_id and model.device.type == "cpu"


@pytest.mark.parametrize("name", EMBEDDERS)
def test_every_registered_recognizer_embeds_unit_vectors_of_its_declared_size(name, astronaut):
    import numpy as np

    from services.recognizer.embedder import load_embedder

    embedder = load_embedder(name, "cpu")
    assert isinstance(embedder, Embedder)
    size = {"dlib150": 150, "arcface112": 112}[embedder.chip_template]
    chips = [np.ascontiguousarray(astronaut[:size, :size]) for _ in range(3)]
    vectors = embedder.embed(chips)
    assert vectors.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
