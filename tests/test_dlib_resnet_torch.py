"""The torch port of dlib's face-recognition ResNet against dlib-bin itself.

Chips are made the way the pipeline makes them for this model (dlib HOG face → 68 landmarks →
`dlib_face_chip`), once per module. Measured figures are printed (run with -s) as well as asserted.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest
import torch

from facepay.models.cache import ModelMissingError, weight_path
from facepay.models.device import DeviceUnavailableError, autocast_dtype
from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip
from services.recognizer.dlib_resnet_torch import (
    WEIGHTS,
    DlibResNetTorch,
    DlibResNetTorchEmbedder,
    read_bool,
    read_float,
    read_int,
    read_network,
    read_string,
    read_tensor,
)
from services.recognizer.embedder import DlibResNetEmbedder
from tests.conftest import FaceData, read_rgb

_DETECT_MAX_SIDE = 800  # HOG on a copy no larger than this (the data has 4600-px photos)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return weight_path(WEIGHTS)
    except ModelMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def torch_embedder(weights: Path) -> DlibResNetTorchEmbedder:
    return DlibResNetTorchEmbedder(device="cpu", weights=weights)


@pytest.fixture(scope="module")
def dlib_embedder(weights: Path) -> DlibResNetEmbedder:
    return DlibResNetEmbedder(weights=weights)


@pytest.fixture(scope="module")
def make_chip():
    hog = dlib.get_frontal_face_detector()
    landmarker = DlibLandmarks68()

    def chip(image: np.ndarray) -> np.ndarray | None:
        """The dlib chip of the largest HOG face (upsampling only when none is found), or None."""
        scale = min(1.0, _DETECT_MAX_SIDE / max(image.shape[:2]))
        small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        small = np.ascontiguousarray(small)
        rects = hog(small, 0) or hog(small, 1)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        box = (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
        (pts,) = landmarker.predict([image], [box])
        return dlib_face_chip(image, pts)

    return chip


@pytest.fixture(scope="module")
def astronaut_chip(astronaut: np.ndarray, make_chip) -> np.ndarray:
    chip = make_chip(astronaut)
    assert chip is not None, "HOG found no face in the astronaut photo"
    return chip


@pytest.fixture(scope="module")
def real_chips(faces: FaceData, make_chip) -> dict[str, np.ndarray]:
    """One chip per identity photo (its largest face), keyed by the photo's relative path."""
    chips = {}
    for people in faces.identities().values():
        for path in people:
            chip = make_chip(read_rgb(path))
            if chip is not None:
                chips[str(path.relative_to(faces.root))] = chip
    assert len(chips) >= 40, f"only {len(chips)} faces found in the identity photos"
    return chips


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ---------------------------------------------------------------- the .dat reader


def _dlib_int(value: int) -> bytes:
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


def test_reader_primitives() -> None:
    """dlib's integer, float, string, bool and tensor encodings, on hand-made bytes."""
    values = [0, 1, -28, 300, -(2**40), 2**63 - 1]
    stream = io.BytesIO(b"".join(_dlib_int(v) for v in values))
    assert [read_int(stream) for _ in values] == values

    # 0.04 as dlib writes it in this model's loss record: mantissa 0xa3d70a, exponent −28.
    assert read_float(io.BytesIO(bytes.fromhex("030ad7a381 1c".replace(" ", "")))) == pytest.approx(0.04, rel=1e-7)
    assert read_string(io.BytesIO(_dlib_int(5) + b"relu_")) == "relu_"
    assert [read_bool(io.BytesIO(b)) for b in (b"0", b"1")] == [False, True]

    data = np.arange(6, dtype=np.float32) - 2.5
    raw = _dlib_int(2) + b"".join(_dlib_int(d) for d in (1, 2, 3, 1)) + struct.pack("<6f", *data)
    tensor = read_tensor(io.BytesIO(raw))
    assert tensor.shape == (1, 2, 3, 1) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor.ravel(), data)


def test_file_layout(weights: Path) -> None:
    """The model file parses to dnn_face_recognition_ex's anet_type, every byte accounted for."""
    net = read_network(weights)
    assert net.loss == pytest.approx({"margin": 0.04, "distance_threshold": 0.6})
    assert net.input_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert net.input_size == (150, 150)
    kinds = [layer.kind for layer in net.layers]
    assert len(kinds) == 108 and net.wrappers.count(1) == 22  # 14 tag1, 4×(tag2 + skip1)
    assert kinds[:4] == ["con_4", "affine_", "relu_", "max_pool_2"] and kinds[-2:] == ["avg_pool_2", "fc_2"]
    convs = [layer.fields for layer in net.layers if layer.type == "con"]
    # k/2 padding at stride 1, none at stride 2.
    assert all(c["padding"] == ((0, 0) if c["stride"] == (2, 2) else (1, 1)) for c in convs[1:])
    assert convs[0]["weight"].shape == (32, 3, 7, 7) and convs[0]["padding"] == (0, 0)
    assert net.layers[-1].fields["weight"].shape == (128, 256) and net.layers[-1].fields["bias"] is None

    model = DlibResNetTorch(net)
    assert len(model.units) == 14
    assert sum(u.shortcut_pool is not None for u in model.units) == 4


# ---------------------------------------------------------------- interface and devices


def test_interface(torch_embedder: DlibResNetTorchEmbedder, dlib_embedder: DlibResNetEmbedder) -> None:
    for attr in ("model_id", "dim", "chip_size", "chip_template", "default_threshold"):
        assert getattr(torch_embedder, attr) == getattr(dlib_embedder, attr), attr
    assert torch_embedder.device == torch.device("cpu")
    assert torch_embedder.embed([]).shape == (0, 128)
    with pytest.raises(ValueError, match="150x150x3 uint8"):
        torch_embedder.embed([np.zeros((112, 112, 3), np.uint8)])


def test_cuda_request_never_falls_back(weights: Path) -> None:
    if torch.cuda.is_available():
        embedder = DlibResNetTorchEmbedder(device="cuda", weights=weights)
        assert embedder.device.type == "cuda" and embedder.compute_dtype == torch.float16
    else:
        with pytest.raises(DeviceUnavailableError):
            DlibResNetTorchEmbedder(device="cuda", weights=weights)
        assert DlibResNetTorchEmbedder(device="auto", weights=weights).device == torch.device("cpu")


def test_fp16_only_on_cuda(torch_embedder: DlibResNetTorchEmbedder, astronaut_chip: np.ndarray) -> None:
    """fp16 is chosen through autocast_dtype, i.e. for CUDA only; and the net survives fp16.

    The half-precision path is exercised here with CPU autocast: activations stay far below
    fp16's range (|x| ≈ 20 at most), so the CUDA path computes the same descriptor.
    """
    assert autocast_dtype(torch.device("cuda")) == torch.float16
    assert autocast_dtype(torch.device("cpu")) == torch.float32
    assert torch_embedder.compute_dtype == autocast_dtype(torch_embedder.device) == torch.float32
    full = torch_embedder.run(astronaut_chip[None], torch.float32)[0]
    half = torch_embedder.run(astronaut_chip[None], torch.float16)[0]
    print(f"\n[fp16] cosine to fp32 {cosine(full, half):.7f}, max abs diff {np.abs(full - half).max():.2e}")
    assert cosine(full, half) >= 0.9999


# ---------------------------------------------------------------- agreement with dlib


def test_astronaut_matches_dlib(
    torch_embedder: DlibResNetTorchEmbedder, dlib_embedder: DlibResNetEmbedder, astronaut_chip: np.ndarray
) -> None:
    ours = torch_embedder.embed_raw([astronaut_chip])[0]
    ref = dlib_embedder.embed_raw([astronaut_chip])[0]
    assert cosine(ours, ref) >= 0.999
    assert np.abs(ours - ref).max() < 1e-4
    np.testing.assert_allclose(torch_embedder.embed([astronaut_chip])[0], ref / np.linalg.norm(ref), atol=1e-5)


def test_real_faces_match_dlib(
    torch_embedder: DlibResNetTorchEmbedder, dlib_embedder: DlibResNetEmbedder, real_chips: dict[str, np.ndarray]
) -> None:
    chips = list(real_chips.values())
    ours = torch_embedder.embed_raw(chips)
    # dlib one chip at a time: its batch call is slower per face than single calls.
    ref = np.concatenate([dlib_embedder.embed_raw([chip]) for chip in chips])
    cos = cosine(ours, ref)
    diff = np.abs(ours - ref)
    worst = list(real_chips)[int(np.argmin(cos))]
    print(
        f"\n[dlib vs torch] {len(chips)} faces: min cosine {cos.min():.9f} ({worst}), "
        f"max abs diff {diff.max():.2e}, mean abs diff {diff.mean():.2e}"
    )
    assert (cos >= 0.999).all(), {name: c for name, c in zip(real_chips, cos, strict=True) if c < 0.999}
    assert diff.max() < 1e-4


def test_batch_equals_one_by_one(
    torch_embedder: DlibResNetTorchEmbedder, weights: Path, real_chips: dict[str, np.ndarray]
) -> None:
    chips = list(real_chips.values())[:16]
    batch = torch_embedder.embed_raw(chips)
    single = np.concatenate([torch_embedder.embed_raw([c]) for c in chips])
    print(f"\n[batch 16 vs one by one] max abs diff {np.abs(batch - single).max():.2e}")
    assert batch.shape == (16, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, single, atol=1e-5)
    # Chunking (max_batch) is invisible too.
    chunked = DlibResNetTorchEmbedder(device="cpu", weights=weights, max_batch=5)
    np.testing.assert_allclose(chunked.embed_raw(chips), batch, atol=1e-5)
