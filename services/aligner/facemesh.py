"""MediaPipe FaceMesh (468 3-D landmarks) run by facepay's TF.js interpreter, plus face crops.

The model takes a 192×192 RGB crop scaled to 0..1 that holds the face about 1.5× its detector
box, upright, and returns 468 (x, y, z) points in crop pixels (z: depth in the same scale,
negative towards the camera) and a face-presence score. `FaceMesh.predict` builds that crop
from a face crop and its box (rotated upright when the detector's five points are given), runs
the batch and maps the points back to the face crop's pixels. `refine=True` runs a second pass
on the crop the first pass's mesh defines, as MediaPipe's tracker does between frames.

`MESH_TO_IBUG68` picks one mesh point per iBUG 300-W point, so `eye_aspect_ratio`,
`five_points_from_68` and head pose work on mesh landmarks unchanged (`mesh_to_68`).

`FaceSquare`/`warp_square` are the crop helpers the other TF.js face models share: a square
region given by centre, side and roll, cut out at any size (optionally a sub-box of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from facepay.models.tfjs import TfjsGraphModel, load_registered

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

# The iBUG 300-W 68 points (0-based) as MediaPipe mesh indices.
#
# Eyes and lips are the semantic matches (the mesh's own eye set, as in MediaPipe's EAR): the
# subject's right eye is image-left, mesh 33 its outer corner (iBUG 36) and 133 its inner
# corner (39), 160/158 upper and 153/144 lower lid (37/38, 40/41); 362/385/387/263/373/380 the
# other eye (42–47); 61/291 the mouth corners (48/54). The jaw outline, brows and a few lip
# points have no exact mesh vertex: each is the vertex nearest dlib's point on average over
# the 64 dev-set identity photos (dlib 68 on HOG boxes vs. this mesh on MTCNN boxes), which
# halves the jaw error of the commonly quoted mapping. Checked on the separate landmarks/ set.
MESH_TO_IBUG68: np.ndarray = np.array(
    [
        127,
        234,
        147,
        215,
        172,
        136,
        149,
        148,
        152,
        400,
        378,
        365,
        367,
        435,
        376,
        454,
        356,  # jaw 0–16
        70,
        63,
        105,
        66,
        55,  # image-left brow 17–21
        285,
        296,
        334,
        293,
        383,  # image-right brow 22–26
        168,
        197,
        5,
        4,  # nose bridge 27–30 (30: tip)
        75,
        97,
        2,
        326,
        305,  # nostrils 31–35
        33,
        160,
        158,
        133,
        153,
        144,  # image-left eye 36–41
        362,
        385,
        387,
        263,
        373,
        380,  # image-right eye 42–47
        61,
        39,
        37,
        0,
        267,
        269,
        291,
        321,
        314,
        17,
        84,
        91,  # outer lips 48–59
        78,
        82,
        13,
        268,
        308,
        317,
        14,
        87,  # inner lips 60–67
    ],
    dtype=np.int64,
)
_EYE_OUTER = (33, 263)  # mesh: image-left eye's outer corner, image-right eye's outer corner

INPUT_SIZE = 192
BOX_SCALE = 1.5  # crop side / detector box side
MESH_BOX_SCALE = 1.5  # refine pass: crop side / side of the mesh's own bounding box


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """(68, 2) float32 iBUG-order (x, y) points from a (468, 2 or 3) mesh."""
    return np.asarray(mesh, dtype=np.float32)[MESH_TO_IBUG68, :2].copy()


# ---------------------------------------------------------------- square crops


@dataclass(frozen=True)
class FaceSquare:
    """A square image region: centre (cx, cy), side in pixels, roll in radians (the direction
    of the square's x axis in the image; 0 = axis-aligned, positive = clockwise as displayed)."""

    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def to_image(self, points: np.ndarray, size: int) -> np.ndarray:
        """Points in a size×size cut of this square (edges at 0 and size) → image pixels."""
        pts = np.asarray(points, dtype=np.float64)
        k = self.side / size
        c, s = math.cos(self.angle), math.sin(self.angle)
        d = (pts[..., :2] - size / 2.0) * k
        out = pts.copy()
        out[..., 0] = self.cx + c * d[..., 0] - s * d[..., 1]
        out[..., 1] = self.cy + s * d[..., 0] + c * d[..., 1]
        if pts.shape[-1] > 2:
            out[..., 2:] = pts[..., 2:] * k
        return out


def face_square(box: Box, points5: np.ndarray | None = None, scale: float = BOX_SCALE) -> FaceSquare:
    """The square `scale`× the box's longer side, on its centre, rolled to the eye line if the
    five points (image-left eye first) are given."""
    x1, y1, x2, y2 = (float(v) for v in box)
    angle = 0.0
    if points5 is not None:
        pts = np.asarray(points5, dtype=np.float64).reshape(-1, 2)
        angle = math.atan2(pts[1, 1] - pts[0, 1], pts[1, 0] - pts[0, 0])
    return FaceSquare((x1 + x2) / 2.0, (y1 + y2) / 2.0, scale * max(x2 - x1, y2 - y1), angle)


def mesh_square(mesh: np.ndarray, scale: float = MESH_BOX_SCALE) -> FaceSquare:
    """The square `scale`× the mesh's bounding box, rolled to the line between the outer eye
    corners: the crop MediaPipe's tracker feeds the next frame."""
    pts = np.asarray(mesh, dtype=np.float64)[:, :2]
    left, right = pts[_EYE_OUTER[0]], pts[_EYE_OUTER[1]]
    angle = math.atan2(right[1] - left[1], right[0] - left[0])
    # The bounding box in the face's own (unrolled) frame, so a tilted head is not over-sized.
    c, s = math.cos(angle), math.sin(angle)
    centre = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    local = (pts - centre) @ np.array([[c, -s], [s, c]])
    lo, hi = local.min(axis=0), local.max(axis=0)
    mid = (lo + hi) / 2.0
    cx, cy = centre + np.array([[c, -s], [s, c]]) @ mid
    return FaceSquare(float(cx), float(cy), float(scale * (hi - lo).max()), angle)


def warp_square(
    image: np.ndarray,
    square: FaceSquare,
    size: int,
    sub: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> np.ndarray:
    """The square (or its sub-box `sub` = x0, y0, x1, y1 as fractions of the side) cut out of
    `image` upright at size×size, bilinear, black outside the image (like tf.image's crops).

    Large reductions first shrink the image with area averaging, so small model inputs cut from
    big faces are not aliased.
    """
    x0, y0, x1, y1 = sub
    scale = square.side * max(x1 - x0, y1 - y0) / size  # source pixels per output pixel
    cx, cy, side = square.cx, square.cy, square.side
    if scale > 2.0:
        f = 1.5 / scale
        h, w = image.shape[:2]
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        fx, fy = image.shape[1] / w, image.shape[0] / h
        # Pixel centres: x_new + 0.5 = (x_old + 0.5) · f
        cx, cy, side = (cx + 0.5) * fx - 0.5, (cy + 0.5) * fy - 0.5, side * (fx + fy) / 2.0
    c, s = math.cos(square.angle), math.sin(square.angle)
    rot = np.array([[c, -s], [s, c]])
    scale_xy = np.diag([(x1 - x0) * side / size, (y1 - y0) * side / size])
    linear = rot @ scale_xy
    # Output pixel u (centre u + 0.5 of the cut) ↔ offset ((x0 + (u+0.5)/size·(x1−x0)) − ½)·side.
    offset = rot @ (scale_xy @ np.array([0.5, 0.5]) + np.array([(x0 - 0.5) * side, (y0 - 0.5) * side]))
    matrix = np.hstack([linear, (np.array([cx, cy]) + offset)[:, None]])
    return cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def check_face_inputs(crops: Sequence[np.ndarray], boxes: Sequence[Box], points5) -> None:
    if len(crops) != len(boxes):
        raise ValueError(f"one box per crop: got {len(crops)} crops and {len(boxes)} boxes")
    if points5 is not None and len(points5) != len(crops):
        raise ValueError(f"one set of five points per crop: got {len(points5)} for {len(crops)} crops")
    for crop in crops:
        if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 RGB crops, got {crop.dtype} {crop.shape}")


def squares_for(boxes: Sequence[Box], points5=None, scale: float = BOX_SCALE) -> list[FaceSquare]:
    return [face_square(b, None if points5 is None else points5[i], scale) for i, b in enumerate(boxes)]


def run_batched(model: TfjsGraphModel, batch: np.ndarray, max_batch: int, outputs=None) -> dict[str, np.ndarray]:
    """NHWC float32 batch → {output: array}, in chunks of max_batch."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(batch), max_batch):
        out = model.run(torch.from_numpy(np.ascontiguousarray(batch[i : i + max_batch])), outputs=outputs)
        for name, value in out.items():
            parts.setdefault(name, []).append(value.cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class MeshResult:
    mesh: np.ndarray  # (468, 3) float32: x, y in the face crop's pixels, z in the same scale
    score: float  # face presence, 0..1
    square: FaceSquare  # the region the (last) pass looked at

    @property
    def landmarks68(self) -> np.ndarray:
        return mesh_to_68(self.mesh)


class FaceMesh:
    """468-point MediaPipe face mesh for given face boxes, batched; CPU or CUDA (fp16)."""

    model_id = "mediapipe-facemesh-468"
    input_size = INPUT_SIZE

    def __init__(self, device: str | torch.device = "auto", max_batch: int = 64, refine: bool = True) -> None:
        self._model = load_registered("facemesh", device)
        self.max_batch = max_batch
        self.refine = refine
        names = self._model.output_aliases
        self._mesh_out, self._score_out = names["output_mesh"], names["output_faceflag"]

    @property
    def device(self) -> torch.device:
        return self._model.device

    def predict(
        self, crops: Sequence[np.ndarray], boxes: Sequence[Box], points5: Sequence[np.ndarray] | None = None
    ) -> list[MeshResult]:
        """One MeshResult per (crop, box): RGB uint8 crops, boxes in crop pixels; the detector's
        five points (image-left eye first) make the crop upright for tilted heads."""
        check_face_inputs(crops, boxes, points5)
        if not crops:
            return []
        results = self._pass(crops, squares_for(boxes, points5))
        if self.refine:
            results = self._pass(crops, [mesh_square(r.mesh) for r in results])
        return results

    def predict_squares(self, crops: Sequence[np.ndarray], squares: Sequence[FaceSquare]) -> list[MeshResult]:
        """One pass on given squares (e.g. the previous frame's `mesh_square`)."""
        return self._pass(crops, squares) if crops else []

    def _pass(self, crops: Sequence[np.ndarray], squares: Sequence[FaceSquare]) -> list[MeshResult]:
        batch = (
            np.stack([warp_square(c, s, INPUT_SIZE) for c, s in zip(crops, squares, strict=True)]).astype(np.float32)
            / 255.0
        )
        out = run_batched(self._model, batch, self.max_batch, [self._mesh_out, self._score_out])
        meshes = out[self._mesh_out].reshape(len(crops), 468, 3)
        scores = out[self._score_out].reshape(len(crops))
        return [
            MeshResult(sq.to_image(m, INPUT_SIZE).astype(np.float32), float(score), sq)
            for m, score, sq in zip(meshes, scores, squares, strict=True)
        ]
