"""Every face detector of the registry on real faces: one interface, the same duties.

Each model in `DETECTORS` must find the labelled face of every identity photo, no face on the
photos without people, the face of a kiosk camera at arm's length (a face filling and
overflowing the frame), image-left-first five points inside the box, and give a batch the
same answer as one image at a time. SCRFD's torch conversion must reproduce onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest

from facepay.config import Settings
from facepay.models.base import FaceModel
from facepay.models.cache import ModelMissingError
from services.detector.detectors import DETECTORS, load_detector
from services.detector.mtcnn import DetectedFace
from tests.conftest import FaceData, read_rgb

KIOSK_INSET = 0.1  # each identity photo cut 10 % inside its MTCNN face box on every side


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def detector(request):
    try:
        return load_detector(request.param, "cpu")
    except ModelMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def identity_photos(faces: FaceData) -> dict[str, np.ndarray]:
    return {row["path"]: read_rgb(faces.path(row["path"])) for row in faces.manifest("identity")}


@pytest.fixture(scope="module")
def kiosk_crops(identity_photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each identity photo cut inside MTCNN's box of its largest face: the same crops for every model."""
    mtcnn = load_detector("mtcnn", "cpu")
    crops = {}
    for path, image in identity_photos.items():
        x1, y1, x2, y2 = max(mtcnn.detect([image])[0], key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box
        dx, dy = KIOSK_INSET * (x2 - x1), KIOSK_INSET * (y2 - y1)
        crops[path] = np.ascontiguousarray(image[round(y1 + dy) : round(y2 - dy), round(x1 + dx) : round(x2 - dx)])
    return crops


def _confident(detector, faces: list[DetectedFace]) -> list[DetectedFace]:
    return [f for f in faces if f.score >= detector.payer_min_score]


def _detect_in_chunks(detector, images: list[np.ndarray], chunk: int = 8) -> list[list[DetectedFace]]:
    found = []
    for start in range(0, len(images), chunk):
        found += detector.detect(images[start : start + chunk])
    return found


def test_detector_states_its_id_device_and_licence(detector) -> None:
    assert isinstance(detector, FaceModel) and detector.model_id and detector.device.type == "cpu"
    assert detector.licence and 0.0 < detector.payer_min_score < 1.0


def test_every_identity_photo_has_a_confident_face(detector, identity_photos) -> None:
    found = _detect_in_chunks(detector, list(identity_photos.values()))
    missed = [path for path, faces in zip(identity_photos, found, strict=True) if not _confident(detector, faces)]
    assert not missed, f"{detector.model_id}: no face at score ≥ {detector.payer_min_score} in {missed}"


def test_photos_without_people_have_no_confident_face(detector, faces: FaceData) -> None:
    rows = faces.manifest("negative")
    assert rows
    for row in rows:
        found = detector.detect([read_rgb(faces.path(row["path"]))])[0]
        assert not _confident(detector, found), f"{row['path']}: {[round(f.score, 3) for f in found]}"


def test_face_filling_the_frame_is_found(detector, kiosk_crops) -> None:
    found = _detect_in_chunks(detector, list(kiosk_crops.values()))
    missed = []
    for (path, crop), faces in zip(kiosk_crops.items(), found, strict=True):
        confident = _confident(detector, faces)
        if not confident:
            missed.append(path)
            continue
        height, width = crop.shape[:2]
        x1, y1, x2, y2 = confident[0].box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, f"{path}: box not clipped to the crop"
    # MTCNN misses 2 of the 64 even with its bordered retry; no model may miss more.
    assert len(missed) <= 2, f"{detector.model_id} missed {len(missed)} kiosk crops: {missed}"


def test_five_points_are_image_left_first_inside_the_box(detector, astronaut: np.ndarray) -> None:
    (face,) = _confident(detector, detector.detect([astronaut])[0])
    left_eye, right_eye, nose, left_mouth, right_mouth = face.points5
    assert face.points5.shape == (5, 2) and face.points5.dtype == np.float32
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = face.box
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.points5)


def test_boxes_follow_mtcnns_convention(detector, identity_photos) -> None:
    # The payer rule's minimum width, the crop margin and the aligner's crops were tuned on
    # MTCNN boxes: every model's box of the same face must be close to MTCNN's.
    mtcnn = load_detector("mtcnn", "cpu")
    paths = sorted(identity_photos)[::4]
    ious = []
    for path in paths:
        (reference, *_), found = mtcnn.detect([identity_photos[path]])[0], detector.detect([identity_photos[path]])[0]
        ious.append(max(_iou(reference.box, f.box) for f in found))
    assert np.median(ious) >= 0.8 and min(ious) >= 0.5, f"IoU with MTCNN's boxes: {np.round(ious, 2).tolist()}"


def test_batch_equals_one_image_at_a_time(detector, faces: FaceData, astronaut: np.ndarray) -> None:
    photos = [read_rgb(faces.path(p)) for p in ("multi/kit_with_rose.jpg", "identities/obama/02.jpg")]
    images = [astronaut, photos[0], np.zeros((0, 0, 3), np.uint8), astronaut[:, ::-1], photos[1]]
    assert_batch_matches_one_at_a_time(detector, images)


def assert_batch_matches_one_at_a_time(detector, images: list[np.ndarray]) -> list:
    """Each image's faces in a batch are its faces alone (box and points within a pixel)."""
    batched = detector.detect(images)
    assert len(batched) == len(images)
    for image, together in zip(images, batched, strict=True):
        (alone,) = detector.detect([image])
        assert len(together) == len(alone)
        for a, b in zip(together, alone, strict=True):
            assert np.allclose(a.box, b.box, atol=1.0)
            assert np.allclose(a.points5, b.points5, atol=1.0)
            assert abs(a.score - b.score) < 1e-3
    return batched


def test_scrfd_torch_conversion_matches_onnxruntime(astronaut: np.ndarray) -> None:
    ort = pytest.importorskip("onnxruntime")
    from facepay.models.cache import weight_path
    from services.detector.scrfd import SCRFD, _canvas, _normalise

    try:
        scrfd = SCRFD("cpu", verify=False)
    except ModelMissingError as exc:
        pytest.skip(str(exc))
    # A real face at the size the detector runs it, not only the random probe checked at load.
    batch = _normalise(_canvas(astronaut, 320 / 512, (320, 320)))[None]
    session = ort.InferenceSession(str(weight_path("scrfd_500m_bnkps.onnx")), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch})
    got = scrfd.raw_outputs(batch)
    assert [g.shape for g in got] == [e.shape for e in expected]
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    print(f"SCRFD torch vs onnxruntime: max abs difference {worst:.2e}")
    assert worst <= 1e-3
    assert max(float(score.max()) for score in expected[:3]) > 0.7  # the agreement covers a real face
    assert scrfd.verify_against_onnxruntime() <= 1e-3


def test_unknown_detector_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="mtcnn"):
        load_detector("yolo-face")
    with pytest.raises(ValueError, match="number of pixels"):
        load_detector("scrfd-500m@big")


def test_stage_and_offline_tools_build_the_configured_detector() -> None:
    from facepay.app.offline import FaceEmbedder
    from services.detector.stage import DetectorStage

    settings = Settings(detector_model="blazeface", device="cpu")
    stage = DetectorStage(settings)
    stage.start()
    offline = FaceEmbedder(settings)
    assert stage.model.model_id == offline.detector.model_id == "mediapipe-blazeface-front"
    assert stage.rule.min_score == offline.rule.min_score == stage.model.payer_min_score


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
