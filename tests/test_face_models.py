"""dlib-backed face models: 68 landmarks, alignment geometry, EAR, head pose, 128-d embeddings.

Face boxes come from dlib's own HOG detector so that these tests do not depend on the
pipeline's detector. Measured figures are printed (run with -s) as well as asserted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from facepay.models.device import DeviceUnavailableError
from services.aligner.geometry import (
    ARCFACE_112,
    align_face,
    eye_aspect_ratio,
    five_points_from_68,
    similarity_transform,
)
from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip
from services.pose.headpose import (
    MEAN_FACE_MM,
    HeadPose,
    PoseGate,
    camera_matrix,
    head_pose,
    line_of_sight_rotation,
    pose_from_rotation,
    rotation_from_pose,
)
from services.recognizer.embedder import DlibResNetEmbedder
from tests.conftest import FaceData, read_rgb

Box = tuple[float, float, float, float]

# HOG runs on a copy no larger than this; the dataset has 4600-px photos and HOG cost grows
# with area, while identity faces stay far above HOG's 80-px minimum at this size.
_DETECT_MAX_SIDE = 800


# ---------------------------------------------------------------- shared fixtures and helpers


@pytest.fixture(scope="module")
def hog() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def landmarker() -> DlibLandmarks68:
    return DlibLandmarks68()


@pytest.fixture(scope="module")
def embedder() -> DlibResNetEmbedder:
    return DlibResNetEmbedder()


def detect_all(hog: dlib.fhog_object_detector, image: np.ndarray, upsample: int = 1) -> list[Box]:
    """Every HOG face box (x1, y1, x2, y2) in image pixels, most confident first.

    Found on a copy no larger than _DETECT_MAX_SIDE, then scaled back.
    """
    scale = min(1.0, _DETECT_MAX_SIDE / max(image.shape[:2]))
    small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    rects, scores, _ = hog.run(np.ascontiguousarray(small), upsample, 0.0)
    ranked = [r for _, r in sorted(zip(scores, rects, strict=True), key=lambda sr: -sr[0])]
    return [(r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale) for r in ranked]


def largest(boxes: list[Box]) -> Box | None:
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), default=None)


def detect_largest(hog: dlib.fhog_object_detector, image: np.ndarray) -> Box | None:
    """The largest face (the labelled person in an identity photo, per the data README).

    HOG's 2× upsampling costs 4× and is only tried when nothing is found without it.
    """
    return largest(detect_all(hog, image, upsample=0)) or largest(detect_all(hog, image, upsample=1))


def detect_best(hog: dlib.fhog_object_detector, image: np.ndarray) -> Box | None:
    """The most confident face: for one-person photos, where a big false positive can outsize it."""
    return next(iter(detect_all(hog, image, upsample=1)), None)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nme(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean point distance normalised by the reference outer-eye-corner distance (36–45)."""
    return float(np.linalg.norm(pred - ref, axis=1).mean() / np.linalg.norm(ref[36] - ref[45]))


@dataclass
class Face:
    size: tuple[int, int]  # (w, h)
    landmarks: np.ndarray  # (68, 2)
    embedding: np.ndarray  # (128,) unit length, from embed()
    raw: np.ndarray  # (128,) dlib's native descriptor, from embed_raw()


@pytest.fixture(scope="module")
def identity_faces(
    faces: FaceData, hog: dlib.fhog_object_detector, landmarker: DlibLandmarks68, embedder: DlibResNetEmbedder
) -> dict[Path, Face | None]:
    """Every identity image once: largest HOG face → landmarks → dlib chip → embedding (None: no face)."""
    in_pairs = {p for a, b, _ in faces.pairs() for p in (a, b)}
    paths = sorted({p for imgs in faces.identities().values() for p in imgs} | in_pairs)
    found: dict[Path, tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}
    for path in paths:
        image = read_rgb(path)
        box = detect_largest(hog, image)
        if box is None:
            continue
        (pts,) = landmarker.predict([image], [box])
        found[path] = ((image.shape[1], image.shape[0]), pts, dlib_face_chip(image, pts))
    raw = embedder.embed_raw([chip for _, _, chip in found.values()])
    out: dict[Path, Face | None] = dict.fromkeys(paths)
    for (path, (size, pts, _)), vec in zip(found.items(), raw, strict=True):
        out[path] = Face(size, pts, vec / np.linalg.norm(vec), vec)
    return out


@pytest.fixture(scope="module")
def astronaut_landmarks(
    astronaut: np.ndarray, hog: dlib.fhog_object_detector, landmarker: DlibLandmarks68
) -> np.ndarray:
    box = detect_best(hog, astronaut)
    assert box is not None, "HOG found no face in the astronaut photo"
    return landmarker.predict([astronaut], [box])[0]


# ---------------------------------------------------------------- devices and interfaces


def test_dlib_models_are_cpu_only() -> None:
    for cls in (DlibLandmarks68, DlibResNetEmbedder):
        assert str(cls(device="auto").device) == "cpu"
        with pytest.raises(DeviceUnavailableError, match="CPU only"):
            cls(device="cuda")


def test_embedder_interface(embedder: DlibResNetEmbedder) -> None:
    assert (embedder.model_id, embedder.dim, embedder.chip_size) == ("dlib-resnet-v1", 128, 150)
    assert embedder.embed([]).shape == (0, 128)
    rng = np.random.default_rng(0)
    chips = [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(3)]
    vecs = embedder.embed(chips)
    assert vecs.shape == (3, 128) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # The batch call gives each chip the same vector as embedding it alone.
    np.testing.assert_allclose(embedder.embed(chips[1:2])[0], vecs[1], atol=1e-5)
    with pytest.raises(ValueError, match="150x150x3"):
        embedder.embed([np.zeros((112, 112, 3), np.uint8)])


# ---------------------------------------------------------------- geometry


def test_similarity_transform_recovers_known_similarity_without_reflection() -> None:
    angle, scale, shift = math.radians(17.0), 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = ARCFACE_112.astype(np.float64)
    matrix = similarity_transform(src, src @ rot.T + shift)
    np.testing.assert_allclose(matrix, np.hstack([rot, shift[:, None]]), atol=1e-9)
    # A mirrored target must still give a proper rotation (det > 0), never a flip.
    mirrored = src * [-1.0, 1.0]
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


def test_arcface_chip_puts_eyes_on_the_template(
    astronaut: np.ndarray,
    astronaut_landmarks: np.ndarray,
    hog: dlib.fhog_object_detector,
    landmarker: DlibLandmarks68,
) -> None:
    five = five_points_from_68(astronaut_landmarks)
    assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0], "image-left eye/mouth corner must come first"
    chip = align_face(astronaut, five)
    assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
    matrix = similarity_transform(five, ARCFACE_112)
    mapped = five @ matrix[:, :2].T + matrix[:, 2]
    # Independent check: find the landmarks again on the chip itself (upscaled 4× so HOG sees it).
    big = cv2.resize(chip, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    box = detect_best(hog, big)
    assert box is not None, "no face found on the aligned chip"
    eyes = five_points_from_68(landmarker.predict([big], [box])[0] / 4.0)[:2]
    err = np.linalg.norm(eyes - ARCFACE_112[:2], axis=1).astype(np.float64)
    warp_err = np.linalg.norm(eyes - mapped[:2], axis=1)
    fit = np.linalg.norm(mapped - ARCFACE_112, axis=1)
    print(
        f"\n[align] chip eye centres vs template {err.round(2).tolist()} px; vs where the transform maps "
        f"them {warp_err.round(2).tolist()} px; 5-point fit residuals {fit.round(2).tolist()} px"
    )
    # The warp itself is exact to landmark noise; the rest is the least-squares compromise of
    # a smiling face (mouth ~7 px off) against the template, so the template bound is 4 px.
    assert warp_err.max() <= 1.0
    assert err.max() <= 4.0


def test_landmarks_agree_with_dlib_reference(
    faces: FaceData, hog: dlib.fhog_object_detector, landmarker: DlibLandmarks68
) -> None:
    reference = json.loads(faces.path("landmarks/landmarks.json").read_text())
    errors: list[tuple[float, str]] = []
    exact: list[float] = []
    unmatched = 0
    for name, ref_faces in reference.items():
        image = read_rgb(faces.path(f"landmarks/{name}"))
        boxes = detect_all(hog, image)
        for face in ref_faces:
            x, y, w, h = face["box"]
            ref_box = (x, y, x + w, y + h)
            ref_pts = np.asarray(face["points"], dtype=np.float32)
            # The JSON's w/h came from dlib rectangles (right = left + w − 1): on exactly those
            # boxes the wrapper must reproduce dlib's own output.
            exact.append(nme(landmarker.predict([image], [(x, y, x + w - 1, y + h - 1)])[0], ref_pts))
            best = max(boxes, key=lambda b: iou(b, ref_box), default=None)
            if best is None or iou(best, ref_box) < 0.5:
                unmatched += 1
                continue
            pred = landmarker.predict([image], [best])[0]
            assert pred.shape == (68, 2) and pred.dtype == np.float32
            errors.append((nme(pred, ref_pts), f"{name} box {face['box']}"))
    total = sum(len(v) for v in reference.values())
    values = np.array([e for e, _ in errors])
    print(
        f"\n[landmarks] {len(errors)}/{total} reference faces matched by IoU≥0.5 ({unmatched} unmatched); "
        f"NME mean {values.mean():.4f}, median {np.median(values):.4f}, max {values.max():.4f} ({max(errors)[1]})"
        f"\n[landmarks] on the reference boxes themselves: NME mean {np.mean(exact):.4f}, max {np.max(exact):.4f}"
    )
    assert np.mean(exact) < 0.01
    assert len(errors) >= 0.9 * total
    assert values.mean() < 0.05


# ---------------------------------------------------------------- eye aspect ratio


def _close_eyes(landmarks68: np.ndarray) -> np.ndarray:
    """Lids shut: move both lids of each eye onto the line between its corners."""
    closed = landmarks68.copy()
    for p1, p2, p3, p4, p5, p6 in ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47)):
        for upper, lower, t in ((p2, p6, 1 / 3), (p3, p5, 2 / 3)):
            on_line = closed[p1] + t * (closed[p4] - closed[p1])
            closed[upper] = on_line + 0.05 * (closed[upper] - on_line)
            closed[lower] = on_line + 0.05 * (closed[lower] - on_line)
    return closed


def test_eye_aspect_ratio(astronaut_landmarks: np.ndarray, identity_faces: dict[Path, Face | None]) -> None:
    open_ear = eye_aspect_ratio(astronaut_landmarks)
    closed_ear = eye_aspect_ratio(_close_eyes(astronaut_landmarks))
    print(
        f"\n[ear] astronaut open {np.round(open_ear, 3).tolist()}, synthetic closed {np.round(closed_ear, 3).tolist()}"
    )
    assert all(c < 0.05 < 0.15 < o for c, o in zip(closed_ear, open_ear, strict=True))
    ears = np.array([np.mean(eye_aspect_ratio(f.landmarks)) for f in identity_faces.values() if f is not None])
    inside = ((ears >= 0.15) & (ears <= 0.45)).mean()
    print(
        f"[ear] identity photos: mean-of-eyes EAR min {ears.min():.3f}, median {np.median(ears):.3f}, "
        f"max {ears.max():.3f}; {inside:.0%} of {len(ears)} within 0.15–0.45"
    )
    assert 0.15 <= np.median(ears) <= 0.45 and inside >= 0.9


# ---------------------------------------------------------------- head pose

_IMAGE_SIZE = (640, 480)
_DISTANCE_MM = 600.0


def _project(rot: np.ndarray, centre_px: tuple[float, float]) -> np.ndarray:
    """Pinhole projection of MEAN_FACE_MM rotated by `rot`, its centroid at pixel `centre_px`."""
    cam = camera_matrix(_IMAGE_SIZE)
    ray = np.linalg.inv(cam) @ np.array([centre_px[0], centre_px[1], 1.0])
    centre = ray / ray[2] * _DISTANCE_MM
    tvec = centre - rot @ MEAN_FACE_MM.mean(axis=0)
    pts, _ = cv2.projectPoints(MEAN_FACE_MM, cv2.Rodrigues(rot)[0], tvec, cam, None)
    return pts.reshape(-1, 2), centre


def _as68(six: np.ndarray) -> np.ndarray:
    pts = np.zeros((68, 2))
    pts[[30, 8, 36, 45, 48, 54]] = six
    return pts


def _pose_grid() -> list[HeadPose]:
    return [
        HeadPose(pitch=float(p), yaw=float(y), roll=float(r))
        for y in range(-40, 41, 10)
        for p in range(-30, 31, 10)
        for r in range(-30, 31, 10)
    ]


def _abs_errors(pairs: list[tuple[HeadPose, HeadPose]]) -> np.ndarray:
    """(N, 3) |estimate − truth| in degrees: pitch, yaw, roll per (truth, estimate) pair."""
    return np.array([[abs(e.pitch - t.pitch), abs(e.yaw - t.yaw), abs(e.roll - t.roll)] for t, e in pairs])


def _max_errors(pairs: list[tuple[HeadPose, HeadPose]]) -> np.ndarray:
    return _abs_errors(pairs).max(axis=0)


def test_head_pose_recovers_synthetic_rotations() -> None:
    rng = np.random.default_rng(7)
    centred, off_centre, camera_frame, noisy = [], [], [], []
    for truth in _pose_grid():
        rot = rotation_from_pose(truth)
        six, _ = _project(rot, (320.0, 240.0))
        centred.append((truth, head_pose(_as68(six), _IMAGE_SIZE)))
        noisy.append((truth, head_pose(_as68(six + rng.normal(0.0, 0.5, six.shape)), _IMAGE_SIZE)))
        # Off-centre: the same apparent pose, seen along a ray 20°/15° off the optical axis.
        px = (320.0 + 640 * math.tan(math.radians(20)), 240.0 - 640 * math.tan(math.radians(15)))
        _, centre = _project(np.eye(3), px)
        world_rot = line_of_sight_rotation(centre) @ rot
        six, _ = _project(world_rot, px)
        off_centre.append((truth, head_pose(_as68(six), _IMAGE_SIZE)))
        in_camera_frame = head_pose(_as68(six), _IMAGE_SIZE, relative_to_line_of_sight=False)
        camera_frame.append((pose_from_rotation(world_rot), in_camera_frame))
    frontal, _ = _project(np.eye(3), (320.0, 240.0))
    face_px = np.linalg.norm(frontal[2] - frontal[3])
    for label, pairs in (
        ("centred", centred),
        ("off-centre, line of sight", off_centre),
        ("off-centre, camera frame", camera_frame),
        (f"centred + 0.5 px noise (eye span {face_px:.0f} px)", noisy),
    ):
        err = _max_errors(pairs)
        print(
            f"\n[pose] {label}: {len(pairs)} poses, max |error| "
            f"pitch {err[0]:.3f}°, yaw {err[1]:.3f}°, roll {err[2]:.3f}°",
            end="",
        )
    print()
    assert _max_errors(centred).max() < 1.0
    assert _max_errors(off_centre).max() < 1.0
    assert _max_errors(camera_frame).max() < 1.0
    noisy_mean = _abs_errors(noisy).mean()
    print(f"[pose] with noise: mean |error| {noisy_mean:.3f}° over all axes")
    assert noisy_mean < 1.0 and _max_errors(noisy).max() < 3.0


def test_head_pose_signs() -> None:
    # Nose towards image right → yaw > 0; nose up → pitch > 0; image-left eye up → roll > 0.
    for truth, field in ((HeadPose(0, 20, 0), "yaw"), (HeadPose(20, 0, 0), "pitch"), (HeadPose(0, 0, 20), "roll")):
        six, _ = _project(rotation_from_pose(truth), (320.0, 240.0))
        nose, left_eye, right_eye = six[0], six[2], six[3]
        frontal, _ = _project(np.eye(3), (320.0, 240.0))
        if field == "yaw":
            assert nose[0] > frontal[0][0]
        elif field == "pitch":
            assert nose[1] < frontal[0][1]
        else:
            assert left_eye[1] < right_eye[1]
        assert getattr(head_pose(_as68(six), _IMAGE_SIZE), field) > 15


def test_head_pose_on_real_faces(
    astronaut: np.ndarray,
    astronaut_landmarks: np.ndarray,
    hog: dlib.fhog_object_detector,
    landmarker: DlibLandmarks68,
    identity_faces: dict[Path, Face | None],
) -> None:
    size = (astronaut.shape[1], astronaut.shape[0])
    pose = head_pose(astronaut_landmarks, size)
    gate = PoseGate()
    # A mirrored photo flips yaw and roll and keeps pitch; a 10° clockwise turn adds 10° roll.
    mirrored = astronaut[:, ::-1].copy()
    m_pose = head_pose(landmarker.predict([mirrored], [detect_best(hog, mirrored)])[0], size)
    turn = cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), -10.0, 1.0)  # negative angle = clockwise
    turned = cv2.warpAffine(astronaut, turn, size)
    t_pose = head_pose(landmarker.predict([turned], [detect_best(hog, turned)])[0], size)

    def fmt(p: HeadPose) -> str:
        return f"pitch {p.pitch:+.1f} yaw {p.yaw:+.1f} roll {p.roll:+.1f}"

    print(
        f"\n[pose] astronaut {fmt(pose)} → gate {gate.check(pose)}; mirrored {fmt(m_pose)}; turned 10° cw {fmt(t_pose)}"
    )
    assert gate.check(pose) is None
    assert abs(m_pose.yaw + pose.yaw) < 3 and abs(m_pose.roll + pose.roll) < 3
    assert abs(m_pose.pitch - pose.pitch) < 3
    assert abs(t_pose.roll - pose.roll - 10.0) < 3

    reasons: dict[str, list[str]] = {}
    found = [(p, f) for p, f in identity_faces.items() if f is not None]
    for path, face in found:
        p = head_pose(face.landmarks, face.size)
        reason = gate.check(p) or "pass"
        label = f"{path.parent.name}/{path.name} (p{p.pitch:+.0f} y{p.yaw:+.0f} r{p.roll:+.0f})"
        reasons.setdefault(reason, []).append(label)
    print(f"[pose] identity photos through PoseGate(): {len(reasons.get('pass', []))}/{len(found)} pass")
    for reason, names in sorted(reasons.items()):
        if reason != "pass":
            print(f"[pose]   {reason}: {', '.join(names)}")
    assert len(reasons.get("pass", [])) >= 0.8 * len(found)


def test_pose_gate_reasons() -> None:
    gate = PoseGate()
    assert gate.check(HeadPose(0, 0, 0)) is None
    assert gate.check(HeadPose(0, -26, 0)) == "pose_yaw"
    assert gate.check(HeadPose(21, 0, 0)) == "pose_pitch"
    assert gate.check(HeadPose(0, 0, 26)) == "pose_roll"
    assert gate.check(HeadPose(25, 30, 30)) == "pose_yaw"  # yaw first: the commonest failure
    with pytest.raises(AttributeError):
        gate.max_abs_yaw = 40  # type: ignore[misc]


# ---------------------------------------------------------------- verification


def test_verification_on_pairs(faces: FaceData, identity_faces: dict[Path, Face | None]) -> None:
    pairs = faces.pairs()
    scores, raw_dist, labels, failed = [], [], [], 0
    for a, b, same in pairs:
        fa, fb = identity_faces[a], identity_faces[b]
        if fa is None or fb is None:
            failed += 1  # no face found: a wrong decision whichever the truth
            continue
        scores.append(float(fa.embedding @ fb.embedding))
        raw_dist.append(float(np.linalg.norm(fa.raw - fb.raw)))
        labels.append(same)
    s, y = np.array(scores), np.array(labels)
    # Accept when cosine ≥ t; try every midpoint between sorted scores (plus both ends).
    ordered = np.sort(s)
    candidates = np.concatenate([[ordered[0] - 1e-6], (ordered[1:] + ordered[:-1]) / 2, [ordered[-1] + 1e-6]])
    accuracy = np.array([((s >= t) == y).sum() / len(pairs) for t in candidates])
    best = int(np.argmax(accuracy))
    # dlib's customary rule is Euclidean distance < 0.6 on its raw vectors. On unit vectors
    # d² = 2 − 2·cos would make that cosine 0.82, but dlib's vectors have norm n ≈ 1.5, where
    # d² ≈ 2n²(1 − cos), i.e. cosine ≈ 1 − 0.18/n².
    cos_06_unit = 1.0 - 0.6**2 / 2.0
    acc_06_unit = ((s >= cos_06_unit) == y).sum() / len(pairs)
    norms = np.array([np.linalg.norm(f.raw) for f in identity_faces.values() if f is not None])
    cos_06_real = 1.0 - 0.6**2 / (2.0 * np.median(norms) ** 2)
    acc_raw = ((np.array(raw_dist) < 0.6) == y).sum() / len(pairs)
    genuine, impostor = s[y], s[~y]
    no_face = [p for p, f in identity_faces.items() if f is None]
    print(
        f"\n[verify] {len(pairs)} pairs ({int(y.sum())} same / {int((~y).sum())} different scored, "
        f"{failed} pairs failed for lack of a face: {[f'{p.parent.name}/{p.name}' for p in no_face]})"
        f"\n[verify] best accuracy {accuracy[best]:.4f} at cosine ≥ {candidates[best]:.4f} "
        f"(midway between scores {ordered[ordered < candidates[best]].max(initial=-1):.4f} "
        f"and {ordered[ordered > candidates[best]].min(initial=1):.4f})"
        f"\n[verify] dlib's Euclidean 0.6 on raw vectors: accuracy {acc_raw:.4f}; raw norms "
        f"{norms.min():.3f}…{norms.max():.3f} (median {np.median(norms):.3f}) → cosine ≈ {cos_06_real:.3f}"
        f"\n[verify] (naive unit-vector reading of 0.6 → cosine {cos_06_unit:.2f}: accuracy {acc_06_unit:.4f})"
        f"\n[verify] genuine cosine {genuine.min():.4f}…{genuine.max():.4f} (median {np.median(genuine):.4f}); "
        f"impostor {impostor.min():.4f}…{impostor.max():.4f} (median {np.median(impostor):.4f})"
    )
    assert accuracy[best] >= 0.95


def test_the_numpy_dlib_chip_gives_the_descriptors_of_dlibs_own_chip(faces):
    """The aligner cuts dlib's chip without dlib (dlib-bin stays the reference here)."""
    import dlib as _dlib

    from services.aligner.geometry import dlib_chip
    from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip
    from services.recognizer.embedder import load_embedder

    detector, landmarks, embedder = (
        _dlib.get_frontal_face_detector(),
        DlibLandmarks68(),
        load_embedder("dlib-resnet-v1", "cpu"),
    )
    cosines = []
    for paths in list(faces.identities().values())[:10]:
        image = read_rgb(paths[0])
        found = detector(image, 1)
        if not found:
            continue
        box = max(found, key=lambda r: r.area())
        lm = landmarks.predict([image], [(box.left(), box.top(), box.right(), box.bottom())])[0]
        ours, theirs = embedder.embed([dlib_chip(image, lm), dlib_face_chip(image, lm)])
        cosines.append(float(ours @ theirs))
    print(f"\nnumpy chip vs dlib.get_face_chip, descriptor cosine: min {min(cosines):.4f} over {len(cosines)} faces")
    assert len(cosines) >= 8 and min(cosines) >= 0.995
