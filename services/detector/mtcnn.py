"""MTCNN face detector (Zhang et al. 2016) in plain torch, batched over images.

P-Net scans an image pyramid (images of the same size share one forward pass per scale);
R-Net and O-Net then each run once over the candidate crops of the whole batch, which is
where batching pays. Weights are facenet-pytorch 2.6.0's Caffe-converted state dicts from
the model cache.

Coordinates are in pixels of the input image; a landmark at (x, y) refers to the pixel whose
centre is at column x, row y (the OpenCV convention `cv2.warpAffine` uses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facepay.models.cache import weight_path
from facepay.models.device import autocast_dtype, resolve_device

log = logging.getLogger(__name__)

MAX_SIDE = 1280  # longer images are downscaled first: the pyramid cost grows with pixel count
RETRY_BORDER = 0.3  # kiosk retry: border added on each side, as a fraction of that side
RETRY_SMALLEST_FACE = 0.5  # the retry looks only for faces at least this fraction of the shorter side
CROP_CHUNK = 512  # R/O-Net crops per forward pass: bounds memory on crowded frames
PNET_CHUNK = 8  # same-size images per P-Net pass: a 1280 px float image is ~15 MB

_PNET_CELL = 12  # P-Net sees 12x12 windows...
_PNET_STRIDE = 2  # ...every 2 pixels of the scaled image
# Half a window of grey around each pyramid level lets P-Net propose faces whose centre is
# in the frame but whose side is cut off by it (a face leaving the kiosk view, a crowd edge).
_PNET_BORDER = _PNET_CELL // 2
# Outside the image the nets see mid-grey: 0 after normalisation, i.e. no signal either way.
_OUTSIDE_GREY = 127.5
_RNET_SIZE = 24
_ONET_SIZE = 48


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input image
    score: float
    # (5, 2) float32 x,y: left eye, right eye, nose, left mouth, right mouth (image left/right
    # as facenet-pytorch orders them)
    points5: np.ndarray


class _PNet(nn.Module):
    """Fully convolutional proposal net: a face probability and box offsets per 12x12 window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        face_prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
        return face_prob, self.conv4_2(x)


def _box(box: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box.ravel())
    return x1, y1, x2, y2


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    # Caffe's dense layers were trained on features flattened in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class _RNet(nn.Module):
    """Refine net on 24x24 crops: face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_caffe_flatten(x)))
        face_prob = torch.softmax(self.dense5_1(x), dim=1)[:, 1]
        return face_prob, self.dense5_2(x)


class _ONet(nn.Module):
    """Output net on 48x48 crops: face probability, box offsets and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_caffe_flatten(x)))
        face_prob = torch.softmax(self.dense6_1(x), dim=1)[:, 1]
        return face_prob, self.dense6_2(x), self.dense6_3(x)


def _load(net: nn.Module, weight_name: str, device: torch.device) -> nn.Module:
    state = torch.load(weight_path(weight_name), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    # channels_last: oneDNN's fast layout on the CPU (measured ~1.3-2x here), tensor cores on CUDA.
    return net.to(device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stubs omit memory_format


@dataclass
class _Candidates:
    """Face candidates of a whole batch, in working-image pixels."""

    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float64
    image: np.ndarray  # (N,) int64 index of the working image each came from

    def take(self, index: np.ndarray) -> _Candidates:
        return _Candidates(self.boxes[index], self.scores[index], self.image[index])

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class _WorkingImage:
    """The image the networks see: the input, maybe downscaled and/or given a border."""

    pixels: np.ndarray  # (H, W, 3) uint8, C-contiguous
    scale: tuple[float, float]  # working pixels per input pixel, (x, y)
    border: tuple[int, int]  # pixels added on the left and on the top (working pixels)
    input_size: tuple[int, int]  # width, height of the caller's image
    smallest_face: float = 0.0  # raises the detector's min_face_size for this image (working pixels)

    @classmethod
    def from_input(cls, image: np.ndarray) -> _WorkingImage:
        height, width = image.shape[:2]
        longest = max(height, width)
        if longest > MAX_SIDE:
            shrink = MAX_SIDE / longest
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # Writable too: torch warns about tensors over read-only memory (e.g. from PIL).
        pixels = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
        scale = (pixels.shape[1] / width, pixels.shape[0] / height)
        return cls(pixels, scale, (0, 0), (width, height))

    def for_retry(self) -> _WorkingImage:
        """This image in a border of its mean colour, searched for frame-filling faces only.

        The border gives a face that fills the frame the context the nets were trained with;
        plain colour adds no edges to mistake for structure. Looking only for large faces keeps
        the retry's pyramid to a few small levels, so an empty scene costs little extra.
        """
        height, width = self.pixels.shape[:2]
        bx, by = round(width * RETRY_BORDER), round(height * RETRY_BORDER)
        mean_colour = [float(c) for c in self.pixels.reshape(-1, 3).mean(axis=0)]
        padded = cv2.copyMakeBorder(self.pixels, by, by, bx, bx, cv2.BORDER_CONSTANT, value=mean_colour)
        border = (self.border[0] + bx, self.border[1] + by)
        smallest_face = RETRY_SMALLEST_FACE * min(height, width)
        return _WorkingImage(padded, self.scale, border, self.input_size, smallest_face)

    def faces_in_input(self, boxes: np.ndarray, scores: np.ndarray, points: np.ndarray) -> list[DetectedFace]:
        """Working-image detections mapped to the caller's pixels; boxes clipped to the image."""
        offset = np.array(self.border, dtype=np.float64)
        scale = np.array(self.scale, dtype=np.float64)
        width, height = self.input_size
        boxes = (boxes.reshape(-1, 2, 2) - offset) / scale
        boxes[..., 0] = boxes[..., 0].clip(0, width)
        boxes[..., 1] = boxes[..., 1].clip(0, height)
        points = (points - offset) / scale
        faces = [
            DetectedFace(_box(box), float(score), pts.astype(np.float32))
            for box, score, pts in zip(boxes, scores, points, strict=True)
            if (box[1] - box[0] >= 1).all()  # a detection that lay wholly in the added border
        ]
        return sorted(faces, key=lambda face: face.score, reverse=True)


class MTCNN:
    """Face detector over batches of RGB images; load once, call `detect` per batch.

    min_face_size counts pixels of the image the nets see: an image longer than MAX_SIDE is
    shrunk to MAX_SIDE first, so there the smallest face found is min_face_size x (longest
    side / MAX_SIDE) input pixels (a 1920 x 1080 frame: 1.5 x min_face_size).
    """

    model_id = "mtcnn-facenet-pytorch-2.6.0"
    licence = "MIT (facenet-pytorch)"
    payer_min_score = 0.9  # the payer rule's threshold, tuned on this model's scores

    def __init__(
        self,
        device: torch.device | str = "cpu",
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
    ) -> None:
        # resolve_device raises when CUDA is asked for but absent: never a silent CPU run.
        self._device = resolve_device(str(device))
        self.min_face_size = int(min_face_size)
        if self.min_face_size < 1:
            raise ValueError(f"min_face_size must be at least 1 pixel, got {min_face_size}")
        self.thresholds = tuple(float(t) for t in thresholds)
        if len(self.thresholds) != 3:
            raise ValueError(f"thresholds needs one value per net (P, R, O), got {thresholds!r}")
        self.scale_factor = float(scale_factor)
        if not 0.0 < self.scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        self._pnet = _load(_PNet(), "mtcnn_pnet.pt", self._device)
        self._rnet = _load(_RNet(), "mtcnn_rnet.pt", self._device)
        self._onet = _load(_ONet(), "mtcnn_onet.pt", self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    def detect(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """images: RGB uint8 HxWx3 arrays of any (different) sizes. Returns faces per image, best first."""
        results: list[list[DetectedFace]] = [[] for _ in images]
        working = {i: _WorkingImage.from_input(im) for i, im in enumerate(images) if is_usable_image(im, i)}
        for i, faces in zip(working, self._detect_working(list(working.values())), strict=True):
            results[i] = faces
        # MTCNN often misses a face whose box is nearly the whole frame (a kiosk camera at arm's
        # length): the nets were trained on faces with some context around them. One retry
        # with a border of plain colour finds most of them, at no cost when faces were found.
        missed = [i for i in working if not results[i]]
        if missed:
            retried = self._detect_working([working[i].for_retry() for i in missed])
            for i, faces in zip(missed, retried, strict=True):
                results[i] = faces
            log.debug("bordered retry of %d images found faces in %d", len(missed), sum(map(bool, retried)))
        return results

    def _detect_working(self, images: list[_WorkingImage]) -> list[list[DetectedFace]]:
        if not images:
            return []
        pixels = [im.pixels for im in images]
        with torch.inference_mode():
            candidates = self._refine(pixels, self._propose(images))
            candidates, points = self._output(pixels, candidates)
        log.debug("mtcnn: %d images, %d faces", len(images), len(candidates))
        faces = []
        for index, image in enumerate(images):
            mine = candidates.image == index
            faces.append(image.faces_in_input(candidates.boxes[mine], candidates.scores[mine], points[mine]))
        return faces

    def _autocast(self) -> AbstractContextManager:
        # fp16 on CUDA (tensor cores); the CPU runs fp32 as is.
        if self._device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=autocast_dtype(self._device))
        return nullcontext()

    def _propose(self, images: list[_WorkingImage]) -> _Candidates:
        """P-Net over each image's pyramid: square candidate boxes, a few hundred per image."""
        return _concat([self._propose_alike(images, chunk) for chunk in _alike_chunks(images, PNET_CHUNK)])

    def _propose_alike(self, images: list[_WorkingImage], indices: list[int]) -> _Candidates:
        """P-Net over images of one size and smallest face: one forward pass per pyramid level."""
        stacked = torch.from_numpy(np.stack([images[i].pixels for i in indices])).to(self._device)
        batch = _normalise(stacked.permute(0, 3, 1, 2))
        height, width = batch.shape[2:]
        smallest_face = max(self.min_face_size, images[indices[0]].smallest_face)
        per_scale = []
        for scale in _pyramid_scales(height, width, smallest_face, self.scale_factor):
            size = (int(height * scale + 1), int(width * scale + 1))
            with self._autocast():
                scaled = F.interpolate(batch, size=size, mode="area")
                scaled = F.pad(scaled, (_PNET_BORDER,) * 4, value=0.0)  # 0 is grey after normalising
                face_prob, offsets = self._pnet(scaled.contiguous(memory_format=torch.channels_last))
            found, found_offsets = _windows_to_boxes(
                face_prob.float(), offsets.float(), self.thresholds[0], (size[1] / width, size[0] / height)
            )
            keep = _nms(found, 0.5)
            per_scale.append((found.take(keep), found_offsets[keep]))
        if not per_scale:
            return _empty_candidates()
        candidates = _concat([c for c, _ in per_scale])
        offsets = np.concatenate([o for _, o in per_scale])
        keep = _nms(candidates, 0.7)
        candidates, offsets = candidates.take(keep), offsets[keep]
        candidates.boxes = _square(_regress(candidates.boxes, offsets))
        candidates.image = np.asarray(indices, dtype=np.int64)[candidates.image]
        return candidates

    def _refine(self, pixels: list[np.ndarray], candidates: _Candidates) -> _Candidates:
        """R-Net once over all candidates of the batch."""
        if not len(candidates):
            return candidates
        crop_boxes = _pixel_boxes(candidates.boxes)
        crops = _crop_resize(pixels, candidates.image, crop_boxes, _RNET_SIZE)
        face_prob, offsets = self._run_chunked(self._rnet, crops)
        passed = np.flatnonzero(face_prob > self.thresholds[1])
        refined = _Candidates(crop_boxes[passed].astype(np.float64), face_prob[passed], candidates.image[passed])
        keep = _nms(refined, 0.7)
        refined = refined.take(keep)
        refined.boxes = _square(_regress(refined.boxes, offsets[passed][keep]))
        return refined

    def _output(self, pixels: list[np.ndarray], candidates: _Candidates) -> tuple[_Candidates, np.ndarray]:
        """O-Net once over all refined candidates: final boxes, scores and 5 landmarks."""
        if not len(candidates):
            return candidates, np.zeros((0, 5, 2))
        crop_boxes = _pixel_boxes(candidates.boxes)
        crops = _crop_resize(pixels, candidates.image, crop_boxes, _ONET_SIZE)
        face_prob, offsets, landmarks = self._run_chunked(self._onet, crops)
        passed = np.flatnonzero(face_prob > self.thresholds[2])
        crop_boxes = crop_boxes[passed].astype(np.float64)
        points = _landmarks_to_points(crop_boxes, landmarks[passed])
        final = _Candidates(_regress(crop_boxes, offsets[passed]), face_prob[passed], candidates.image[passed])
        # "Min" overlap: also drops a small box nested inside a bigger one on the same face.
        keep = _nms(final, 0.7, use_min_area=True)
        return final.take(keep), points[keep]

    def _run_chunked(self, net: nn.Module, crops: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = []
        for start in range(0, len(crops), CROP_CHUNK):
            # (N, H, W, 3) memory seen as NCHW is already channels_last: no copy.
            chunk = torch.from_numpy(crops[start : start + CROP_CHUNK]).to(self._device).permute(0, 3, 1, 2)
            with self._autocast():
                outputs.append(net(_normalise(chunk)))
        return tuple(torch.cat(parts).float().cpu().numpy().astype(np.float64) for parts in zip(*outputs, strict=True))


def is_usable_image(image: object, index: int, detector: str = "mtcnn") -> bool:
    """An RGB uint8 HxWx3 array with pixels; anything else is logged and gets no faces (every
    detector of services.detector.detectors takes its images the same way)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        log.warning("%s: image %d is not an RGB uint8 HxWx3 array (%s); no faces", detector, index, kind)
        return False
    return image.size > 0


def _alike_chunks(images: list[_WorkingImage], chunk: int) -> Iterator[list[int]]:
    """Indices of images that can share P-Net passes: same size and smallest face."""
    alike: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        alike.setdefault((image.pixels.shape, image.smallest_face), []).append(index)
    for indices in alike.values():
        for start in range(0, len(indices), chunk):
            yield indices[start : start + chunk]


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    # The Caffe nets were trained on (x - 127.5) / 128.
    return (pixels.float() - 127.5) * (1.0 / 128.0)


def _pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales that map faces from min_face_size up to the whole image onto P-Net's 12 px window."""
    scale = _PNET_CELL / min_face_size
    shortest = min(height, width) * scale
    scales = []
    while shortest >= _PNET_CELL:
        scales.append(scale)
        scale *= factor
        shortest *= factor
    return scales


def _windows_to_boxes(
    face_prob: torch.Tensor, offsets: torch.Tensor, threshold: float, scale: tuple[float, float]
) -> tuple[_Candidates, np.ndarray]:
    """P-Net maps (B, h, w) and (B, 4, h, w) → boxes of windows above threshold, with offsets."""
    hits = face_prob >= threshold
    image, row, col = (t.cpu().numpy() for t in hits.nonzero(as_tuple=True))
    scores = face_prob[hits].cpu().numpy().astype(np.float64)
    window_offsets = offsets.permute(0, 2, 3, 1)[hits].cpu().numpy().astype(np.float64)
    x1, y1 = _PNET_STRIDE * col - _PNET_BORDER, _PNET_STRIDE * row - _PNET_BORDER
    x2, y2 = x1 + _PNET_CELL, y1 + _PNET_CELL
    boxes = np.stack([x1 / scale[0], y1 / scale[1], x2 / scale[0], y2 / scale[1]], axis=1).reshape(-1, 4)
    return _Candidates(boxes.astype(np.float64), scores, image.astype(np.int64)), window_offsets


def _nms(candidates: _Candidates, threshold: float, use_min_area: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression within each image; kept indices, best score first.

    Overlap is intersection over union, or over the smaller box with use_min_area.
    """
    boxes, image = candidates.boxes, candidates.image
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # A stable sort keeps ties in input order, so a batch and its single images agree.
    order = np.argsort(-candidates.scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0])
        height = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1])
        inter = width.clip(min=0) * height.clip(min=0)
        denom = np.minimum(areas[best], areas[rest]) if use_min_area else areas[best] + areas[rest] - inter
        overlap = inter / np.maximum(denom, 1e-9)
        order = rest[(overlap <= threshold) | (image[rest] != image[best])]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the nets' box offsets, which are fractions of the box width and height."""
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    return boxes + offsets * size


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre: the next net expects square crops."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(axis=1, keepdims=True) / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def _pixel_boxes(boxes: np.ndarray) -> np.ndarray:
    """Whole-pixel crop boxes (at least 1 px); the next net's offsets are relative to these."""
    crop = np.rint(boxes).astype(np.int64)
    crop[:, 2:] = np.maximum(crop[:, 2:], crop[:, :2] + 1)
    return crop


def _landmarks_to_points(crop_boxes: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """O-Net landmarks (x1..x5, y1..y5 as fractions of the crop) → (N, 5, 2) pixels."""
    size = crop_boxes[:, 2:] - crop_boxes[:, :2]
    fractions = landmarks.reshape(-1, 2, 5).transpose(0, 2, 1)
    return crop_boxes[:, None, :2] + fractions * size[:, None, :]


def _area_bins(start: np.ndarray, length: np.ndarray, size: int, limit: int) -> tuple[np.ndarray, ...]:
    """Bin edges of an area resize of [start, start+length) to `size` bins, as adaptive pooling
    (and so F.interpolate mode="area") places them; edges clamped to the image [0, limit]."""
    i = np.arange(size)
    lo = start[:, None] + (i * length[:, None]) // size
    hi = start[:, None] - (-(i + 1) * length[:, None] // size)
    return lo.clip(0, limit), hi.clip(0, limit), hi - lo


def _crop_resize(pixels: list[np.ndarray], image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) float32 crops of whole-pixel boxes, area-resized as F.interpolate does.

    Each crop is size² sums read off a summed-area table, whatever the box size, so the whole
    batch costs a few gathers. The part of a box outside the image is grey rather than
    stretched away, so a face cut off by the frame keeps its shape. This runs on the CPU:
    the crops are tiny next to the P-Net pyramid.
    """
    crops = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for index in np.unique(image):
        mine = np.flatnonzero(image == index)
        height, width = pixels[index].shape[:2]
        box = boxes[mine]
        y_lo, y_hi, y_len = _area_bins(box[:, 1], box[:, 3] - box[:, 1], size, height)
        x_lo, x_hi, x_len = _area_bins(box[:, 0], box[:, 2] - box[:, 0], size, width)
        rows_lo, rows_hi = y_lo[:, :, None], y_hi[:, :, None]
        cols_lo, cols_hi = x_lo[:, None, :], x_hi[:, None, :]
        # int32 sums are exact up to 8.4 M pixels (255 each): 2048 x 2048 after the retry border.
        table = cv2.integral(pixels[index])
        inside_sum = table[rows_hi, cols_hi] - table[rows_lo, cols_hi] - table[rows_hi, cols_lo]
        inside_sum += table[rows_lo, cols_lo]
        bin_area = y_len[:, :, None] * x_len[:, None, :]
        outside_area = bin_area - (rows_hi - rows_lo) * (cols_hi - cols_lo)
        crops[mine] = (inside_sum + (_OUTSIDE_GREY * outside_area)[..., None]) / bin_area[..., None]
    return crops


def _concat(parts: list[_Candidates]) -> _Candidates:
    if not parts:
        return _empty_candidates()
    return _Candidates(
        np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.image for p in parts]),
    )


def _empty_candidates() -> _Candidates:
    return _Candidates(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
