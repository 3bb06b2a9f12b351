"""The MTCNN face detector on real photos: what it must find, and what it must not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from facepay.models.cache import ModelMissingError
from facepay.models.device import DeviceUnavailableError
from services.detector.mtcnn import MTCNN, DetectedFace
from tests.conftest import FaceData, read_rgb
from tests.test_detectors import assert_batch_matches_one_at_a_time

# Photos whose counted faces include one MTCNN misses at its default thresholds, with why.
KNOWN_MISSES = {
    # The woman in the bottom-left corner shows well under half her face; R-Net scores the
    # crop just below 0.7 (found at 0.86 when R-Net's threshold is lowered to 0.3).
    "multi/deepface_selfie-many-people.jpg": 1,
}


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    try:
        return MTCNN("cpu")
    except ModelMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def identity_faces(detector: MTCNN, faces: FaceData) -> dict[str, list[DetectedFace]]:
    """Every identity image's detections, keyed by manifest path (detected 8 images a batch)."""
    paths = [row["path"] for row in faces.manifest("identity")]
    found: dict[str, list[DetectedFace]] = {}
    for start in range(0, len(paths), 8):
        chunk = paths[start : start + 8]
        found.update(zip(chunk, detector.detect([read_rgb(faces.path(p)) for p in chunk]), strict=True))
    return found


def _box_area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _inset_crop(image: np.ndarray, box: tuple[float, float, float, float], inset: float) -> np.ndarray:
    """The image inside `box` shrunk by `inset` of its size on every side."""
    x1, y1, x2, y2 = box
    dx, dy = inset * (x2 - x1), inset * (y2 - y1)
    return np.ascontiguousarray(image[round(y1 + dy) : round(y2 - dy), round(x1 + dx) : round(x2 - dx)])


def test_every_identity_image_has_a_face(identity_faces: dict[str, list[DetectedFace]], record_property) -> None:
    missed = [path for path, found in identity_faces.items() if not found]
    summary = f"identity images with a face: {len(identity_faces) - len(missed)}/{len(identity_faces)}"
    record_property("identity_images_with_a_face", summary)
    print(summary)
    assert not missed, f"{summary}; none found in {missed}"


def test_faces_are_well_formed_and_best_first(identity_faces: dict[str, list[DetectedFace]]) -> None:
    for found in identity_faces.values():
        assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
        for face in found:
            x1, y1, x2, y2 = face.box
            assert x2 > x1 and y2 > y1
            assert face.points5.shape == (5, 2) and face.points5.dtype == np.float32
            assert 0.7 < face.score <= 1.0


def test_counted_faces_in_group_photos_are_found(detector: MTCNN, faces: FaceData) -> None:
    # `multi` photos, plus the `landmarks` photos that give a count; extra detections (people in
    # the background, faces cut off by the frame) are tolerated.
    rows = [r for r in faces.manifest("multi") + faces.manifest("landmarks") if r["faces"]]
    shortfalls = {}
    for row in rows:
        found = detector.detect([read_rgb(faces.path(row["path"]))])[0]
        wanted = int(row["faces"]) - KNOWN_MISSES.get(row["path"], 0)
        print(f"{row['path']}: {len(found)} found, {row['faces']} counted")
        if len(found) < wanted:
            shortfalls[row["path"]] = (len(found), wanted)
    assert not shortfalls, f"(found, wanted) per photo: {shortfalls}"


def test_photos_without_people_have_no_confident_face(detector: MTCNN, faces: FaceData) -> None:
    # Real behaviour: no detection at all in dog, dogs and eagle at the default thresholds, even
    # after the bordered retry; with all thresholds loosened to (0.5, 0.5, 0.1) the best animal
    # crop scores about 0.58. The 0.9 bar leaves room for threshold tuning.
    rows = faces.manifest("negative")
    assert rows
    for row in rows:
        found = detector.detect([read_rgb(faces.path(row["path"]))])[0]
        assert all(f.score < 0.9 for f in found), f"{row['path']}: {[f.score for f in found]}"


def test_face_filling_the_frame_is_found(
    detector: MTCNN, faces: FaceData, identity_faces: dict[str, list[DetectedFace]]
) -> None:
    # A kiosk camera at arm's length: each identity's first photo cropped 10 % inside its own
    # face box, so the face overflows the frame on every side. A plain MTCNN pass misses about
    # a sixth of these; the bordered retry finds them.
    first_photos = {p.relative_to(faces.root).as_posix() for p, *_ in faces.identities().values()}
    for path in sorted(first_photos):
        crop = _inset_crop(read_rgb(faces.path(path)), identity_faces[path][0].box, 0.1)
        found = detector.detect([crop])[0]
        height, width = crop.shape[:2]
        assert found, f"{path}: no face in the {width}x{height} tight crop"
        x1, y1, x2, y2 = found[0].box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height  # clipped to the crop
        assert _box_area(found[0].box) >= 0.8 * width * height


def test_astronaut_has_one_upright_face(detector: MTCNN, astronaut: np.ndarray) -> None:
    (face,) = detector.detect([astronaut])[0]
    left_eye, right_eye, nose, left_mouth, right_mouth = face.points5
    assert face.score > 0.99
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]  # image left first
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = face.box
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.points5)


def test_large_image_is_mapped_back_to_its_own_pixels(detector: MTCNN, astronaut: np.ndarray) -> None:
    # 2048 px exceeds the 1280 px cap: detection runs on the image shrunk 1.6x, and the results
    # come back in 2048 px pixels, matching what the shrunk image gives scaled up by 1.6.
    large = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    shrunk = cv2.resize(large, (1280, 1280), interpolation=cv2.INTER_AREA)
    (big,) = detector.detect([large])[0]
    (small,) = detector.detect([shrunk])[0]
    assert np.allclose(big.box, np.array(small.box) * 1.6, atol=1.0)
    assert np.allclose(big.points5, small.points5 * 1.6, atol=1.0)


def test_batch_equals_one_image_at_a_time(detector: MTCNN, faces: FaceData, astronaut: np.ndarray) -> None:
    photos = [read_rgb(faces.path(p)) for p in ("multi/kit_with_rose.jpg", "identities/obama/02.jpg")]
    kiosk_crop = _inset_crop(astronaut, detector.detect([astronaut])[0][0].box, 0.14)  # needs the retry
    # Two same-size images share a P-Net pass; an unusable one must not disturb the others.
    images = [astronaut, photos[0], np.zeros((0, 0, 3), np.uint8), astronaut[:, ::-1], photos[1], kiosk_crop]
    batched = assert_batch_matches_one_at_a_time(detector, images)
    assert [len(found) for found in batched] == [1, 2, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 640, 3), np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((480, 640, 3), np.uint8),  # a covered camera
        np.zeros((480, 640), np.uint8),  # grey, not RGB
        np.zeros((480, 640, 4), np.uint8),  # RGBA
        np.zeros((480, 640, 3), np.float32),  # not uint8
        None,
    ],
    ids=["0x0", "0x640", "1x1", "black", "2d", "rgba", "float", "none"],
)
def test_unusable_image_gives_no_faces(detector: MTCNN, image: np.ndarray) -> None:
    assert detector.detect([image]) == [[]]


def test_empty_batch(detector: MTCNN) -> None:
    assert detector.detect([]) == []


def test_cuda_asked_for_but_absent_raises() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailableError):
        MTCNN("cuda")


def test_identity(detector: MTCNN) -> None:
    assert detector.device == torch.device("cpu")
    assert MTCNN.model_id == "mtcnn-facenet-pytorch-2.6.0"
