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
