"""Face geometry in plain numpy/cv2: similarity alignment, 68→5 point reduction, eye aspect ratio.

No model weights here, so everything is cheap to unit-test and safe to call from any stage.
Points are (x, y) in pixels, image-left first, as every detector and landmark model in facepay
returns them.
"""

from __future__ import annotations

import cv2
import numpy as np

# InsightFace's 5-point template for a 112×112 ArcFace chip: image-left eye, image-right eye,
# nose tip, image-left mouth corner, image-right mouth corner. Recognisers trained on chips
# warped to exactly these points expect exactly these points.
ARCFACE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# iBUG 300-W indices (0-based) used below.
_LEFT_EYE = slice(36, 42)  # image-left eye (the subject's right eye): 36 outer … 39 inner corner
_RIGHT_EYE = slice(42, 48)  # image-right eye: 42 inner … 45 outer corner
_NOSE_TIP = 30
_MOUTH_LEFT, _MOUTH_RIGHT = 48, 54


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """The 2×3 least-squares similarity (rotation, uniform scale, shift) mapping src onto dst.

    Umeyama (1991) with the reflection case excluded: a mirrored face is a different face, so
    the fit must never flip one to match a template.
    """
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need ≥2 matching points, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("source points coincide; no similarity transform exists")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0  # flip the weakest axis instead of reflecting
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    shift = dst_mean - scale * rot @ src_mean
    return np.hstack([scale * rot, shift[:, None]]).astype(np.float64)


def align_face(
    image_rgb: np.ndarray,
    points5: np.ndarray,
    template: np.ndarray = ARCFACE_112,
    size: tuple[int, int] = (112, 112),
) -> np.ndarray:
    """Warp the face whose five points are `points5` onto `template`, giving a `size` (w, h) chip."""
    matrix = similarity_transform(points5, template)
    # Linear interpolation and replicated borders: the same choices as InsightFace's norm_crop,
    # so chips match what ArcFace-family models were trained on.
    return cv2.warpAffine(image_rgb, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def five_points_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """The ARCFACE_112 five points (eye centres, nose tip, mouth corners) from iBUG-68 landmarks."""
    pts = np.asarray(landmarks68, dtype=np.float32).reshape(68, 2)
    return np.stack(
        [
            pts[_LEFT_EYE].mean(axis=0),
            pts[_RIGHT_EYE].mean(axis=0),
            pts[_NOSE_TIP],
            pts[_MOUTH_LEFT],
            pts[_MOUTH_RIGHT],
        ]
    ).astype(np.float32)


def _ear(eye: np.ndarray) -> float:
    # eye = p1..p6 in iBUG order: p1/p4 the corners, p2/p3 upper lid, p6/p5 lower lid.
    p1, p2, p3, p4, p5, p6 = eye.astype(np.float64)
    width = np.linalg.norm(p1 - p4)
    if width <= 1e-9:
        return 0.0
    return float((np.linalg.norm(p2 - p6) + np.linalg.norm(p3 - p5)) / (2.0 * width))


def eye_aspect_ratio(landmarks68: np.ndarray) -> tuple[float, float]:
    """Eye aspect ratio (Soukupová & Čech 2016) of the image-left and image-right eye.

    Roughly 0.25–0.35 for an open eye, falling towards 0 as the lid closes; scale-invariant, so
    one blink threshold works at any face size.
    """
    pts = np.asarray(landmarks68, dtype=np.float32).reshape(68, 2)
    return _ear(pts[_LEFT_EYE]), _ear(pts[_RIGHT_EYE])


def laplacian_variance(rgb: np.ndarray) -> float:
    """Focus measure: variance of the Laplacian of the grey image (blurred chips score low)."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


# dlib's mean face (points 17–67 of the iBUG 68, unit square), from dlib's
# get_face_chip_details, so that chips match what dlib's ResNet was trained on.
_DLIB_MEAN_FACE_X = [
    0.000213256,
    0.0752622,
    0.18113,
    0.29077,
    0.393397,
    0.586856,
    0.689483,
    0.799124,
    0.904991,
    0.98004,
    0.490127,
    0.490127,
    0.490127,
    0.490127,
    0.36688,
    0.426036,
    0.490127,
    0.554217,
    0.613373,
    0.121737,
    0.187122,
    0.265825,
    0.334606,
    0.260918,
    0.182743,
    0.645647,
    0.714428,
    0.793132,
    0.858516,
    0.79751,
    0.719335,
    0.254149,
    0.340985,
    0.428858,
    0.490127,
    0.551395,
    0.639268,
    0.726104,
    0.642159,
    0.556721,
    0.490127,
    0.423532,
    0.338094,
    0.290379,
    0.428096,
    0.490127,
    0.552157,
    0.689874,
    0.553364,
    0.490127,
    0.42689,
]
_DLIB_MEAN_FACE_Y = [
    0.106454,
    0.038915,
    0.0187482,
    0.0344891,
    0.0773906,
    0.0773906,
    0.0344891,
    0.0187482,
    0.038915,
    0.106454,
    0.203352,
    0.307009,
    0.409805,
    0.515625,
    0.587326,
    0.609345,
    0.628106,
    0.609345,
    0.587326,
    0.216423,
    0.178758,
    0.179852,
    0.231733,
    0.245099,
    0.244077,
    0.231733,
    0.179852,
    0.178758,
    0.216423,
    0.244077,
    0.245099,
    0.780233,
    0.745405,
    0.727388,
    0.742578,
    0.727388,
    0.745405,
    0.780233,
    0.864805,
    0.902192,
    0.909281,
    0.902192,
    0.864805,
    0.784792,
    0.778746,
    0.785343,
    0.778746,
    0.784792,
    0.824182,
    0.831803,
    0.824182,
]
# dlib aligns on the eyes, nose and upper lip: no jaw, eyebrows or lower lip.
_DLIB_CHIP_POINTS = [i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)]


def dlib_chip(image_rgb: np.ndarray, landmarks68: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """dlib's `get_face_chip` in numpy/cv2: a similarity transform of 68 landmarks onto dlib's
    mean face (with padding), sampled bilinearly; a face much larger than the chip is first
    reduced by area averaging, as dlib's pyramid does, so the chip is not aliased."""
    template = np.array(
        [
            [
                (padding + _DLIB_MEAN_FACE_X[i - 17]) / (2 * padding + 1) * size,
                (padding + _DLIB_MEAN_FACE_Y[i - 17]) / (2 * padding + 1) * size,
            ]
            for i in _DLIB_CHIP_POINTS
        ],
        dtype=np.float64,
    )
    chip_to_image = similarity_transform(template, np.asarray(landmarks68, np.float64)[_DLIB_CHIP_POINTS])
    scale = float(np.hypot(chip_to_image[0, 0], chip_to_image[1, 0]))
    source = image_rgb
    if scale > 1.5:
        source = cv2.resize(image_rgb, None, fx=1 / scale, fy=1 / scale, interpolation=cv2.INTER_AREA)
        chip_to_image = chip_to_image / scale
    return cv2.warpAffine(
        np.ascontiguousarray(source),
        chip_to_image,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
    )


def aligned_chips(crop_rgb: np.ndarray, landmarks68: np.ndarray) -> dict[str, np.ndarray]:
    """The chips the recognizers read, by their `chip_template`: ArcFace's 112×112 template
    (from the five points) and dlib's 150×150 chip. The aligner stage sends both on; the offline
    tools take the one their recognizer reads."""
    return {
        "arcface112": align_face(crop_rgb, five_points_from_68(landmarks68)),
        "dlib150": dlib_chip(crop_rgb, landmarks68),
    }


def chip_sharpness(chips: dict[str, np.ndarray]) -> float:
    """The sharpness the enrollment gate checks: measured on the dlib chip, whichever recognizer
    runs, so one `enroll_min_sharpness` means the same for every model."""
    return round(laplacian_variance(chips["dlib150"]), 2)
