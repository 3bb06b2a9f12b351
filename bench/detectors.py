"""Misses and false positives of each face detector on the real-face data, in one run.

    .venv/bin/python bench/detectors.py [--data ../shared/data] [--detectors mtcnn,scrfd-500m,...]

Sets (FACEPAY_TEST_DATA or --data; nothing is copied):
- `faces/` identities (64 photos): a miss is a photo with no face at the detector's payer score;
- `faces/` multi-face photos plus the `landmarks` photos that give a count: a miss is each
  counted face not found (a shortfall in confident faces);
- `faces/` negatives (dog, dogs, eagle): a false positive is any confident face;
- `faces-lfw/` (2,500 photos; LFW's rule: the labelled person is the face nearest the centre,
  and deep-funnelled frames centre it): a miss is a photo where no confident face covers the
  image centre;
- kiosk crops: every identity photo cut 10 % inside its MTCNN face box, so the face fills and
  overflows the frame (a terminal camera at arm's length): a miss is no confident face.

"Confident" is the detector's own `payer_min_score` (the payer rule's bar for that model). The
box agreement with MTCNN (median IoU, width and height ratios) on the identity photos is printed
too: the aligner's crops were tuned on MTCNN boxes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import FaceData, read_rgb

KIOSK_INSET = 0.1


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inset_crop(image: np.ndarray, box, inset: float) -> np.ndarray:
    x1, y1, x2, y2 = box
    dx, dy = inset * (x2 - x1), inset * (y2 - y1)
    return np.ascontiguousarray(image[round(y1 + dy) : round(y2 - dy), round(x1 + dx) : round(x2 - dx)])


def _detect_all(detector, images: list[np.ndarray], chunk: int = 16) -> list:
    out = []
    for start in range(0, len(images), chunk):
        out += detector.detect(images[start : start + chunk])
    return out


def _largest(faces):
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def main(argv: list[str] | None = None) -> int:
    from services.detector.detectors import DETECTORS, load_detector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FACEPAY_TEST_DATA", "../shared/data"))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lfw-limit", type=int, default=0, help="first N LFW photos only (0: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    faces, lfw = FaceData(Path(args.data) / "faces"), FaceData(Path(args.data) / "faces-lfw")
    identity_rows = faces.manifest("identity")
    identity = [read_rgb(faces.path(r["path"])) for r in identity_rows]
    counted = [r for r in faces.manifest("multi") + faces.manifest("landmarks") if r["faces"]]
    multi = [read_rgb(faces.path(r["path"])) for r in counted]
    negatives = [read_rgb(faces.path(r["path"])) for r in faces.manifest("negative")]
    lfw_rows = lfw.manifest()
    if args.lfw_limit:
        lfw_rows = lfw_rows[: args.lfw_limit]
    lfw_images = [read_rgb(lfw.path(r["path"])) for r in lfw_rows]

    mtcnn = load_detector("mtcnn")
    reference = [_largest(f).box if f else None for f in _detect_all(mtcnn, identity)]
    kiosk = [_inset_crop(im, box, KIOSK_INSET) for im, box in zip(identity, reference, strict=True) if box is not None]

    # Faces a payer could be (at least the pipeline's 40 px) in the group photos, as MTCNN finds them.
    multi_reference = [
        [f.box for f in faces_ if f.score >= mtcnn.payer_min_score and f.box[2] - f.box[0] >= 40]
        for faces_ in _detect_all(mtcnn, multi)
    ]
    rows = []
    for name in args.detectors.split(","):
        detector = load_detector(name)
        bar = detector.payer_min_score
        start = time.perf_counter()
        found_identity = _detect_all(detector, identity)
        found_multi = _detect_all(detector, multi)
        found_negative = _detect_all(detector, negatives)
        found_lfw = _detect_all(detector, lfw_images)
        found_kiosk = _detect_all(detector, kiosk)
        seconds = time.perf_counter() - start

        def confident(found):
            return [[f for f in faces_ if f.score >= bar] for faces_ in found]  # noqa: B023 - used in this iteration

        identity_misses = [r["path"] for r, f in zip(identity_rows, confident(found_identity), strict=True) if not f]
        multi_short = {
            r["path"]: int(r["faces"]) - len(f)
            for r, f in zip(counted, confident(found_multi), strict=True)
            if len(f) < int(r["faces"])
        }
        false_pos = sum(len(f) for f in confident(found_negative))
        lfw_misses = []
        for r, im, f in zip(lfw_rows, lfw_images, confident(found_lfw), strict=True):
            cy, cx = im.shape[0] / 2, im.shape[1] / 2
            if not any(b.box[0] <= cx <= b.box[2] and b.box[1] <= cy <= b.box[3] for b in f):
                lfw_misses.append(r["path"])
        kiosk_misses = sum(1 for f in confident(found_kiosk) if not f)
        sized_misses = sum(
            1
            for ref_faces, f in zip(multi_reference, confident(found_multi), strict=True)
            for ref in ref_faces
            if not any(_iou(ref, x.box) >= 0.3 for x in f)
        )
        ious, widths, heights, shifts = [], [], [], []
        for ref, f in zip(reference, found_identity, strict=True):
            if ref is None or not f:
                continue
            best = max(f, key=lambda x: _iou(x.box, ref))
            ious.append(_iou(best.box, ref))
            bw, bh = best.box[2] - best.box[0], best.box[3] - best.box[1]
            rw, rh = ref[2] - ref[0], ref[3] - ref[1]
            widths.append(rw / bw)
            heights.append(rh / bh)
            shifts.append(((ref[1] + ref[3]) / 2 - (best.box[1] + best.box[3]) / 2) / bh)
        scores_found = [max(x.score for x in f) for f in found_identity if f]
        scores_neg = [x.score for f in found_negative for x in f]
        rows.append(
            (
                name,
                detector.model_id,
                detector.licence,
                len(identity_misses),
                sum(multi_short.values()),
                false_pos,
                len(lfw_misses),
                kiosk_misses,
                seconds,
                sized_misses,
            )
        )
        print(f"\n{name} ({detector.model_id}; payer score ≥ {bar}) {seconds:.1f} s for all sets")
        print(f"  identity misses {len(identity_misses)}/{len(identity)} {identity_misses}")
        print(f"  multi-face shortfall {sum(multi_short.values())} {multi_short}")
        print(f"  multi-face: MTCNN's faces >= 40 px not found: {sized_misses}/{sum(map(len, multi_reference))}")
        print(f"  negatives: {false_pos} confident faces; all scores {np.round(scores_neg, 3).tolist()}")
        print(f"  lfw misses {len(lfw_misses)}/{len(lfw_images)} {lfw_misses[:12]}")
        print(f"  kiosk misses {kiosk_misses}/{len(kiosk)}")
        print(f"  identity best score: min {min(scores_found):.3f}, 5th pct {np.percentile(scores_found, 5):.3f}")
        if ious:
            print(
                f"  vs MTCNN box: IoU median {np.median(ious):.3f} (min {min(ious):.3f}); MTCNN/this "
                f"width {np.median(widths):.3f}, height {np.median(heights):.3f}, centre shift "
                f"{np.median(shifts):+.3f} of this height"
            )
        sys.stdout.flush()

    print(
        f"\n{'detector':<16} {'identity':>8} {'multi':>6} {'multi≥40':>8} {'neg FP':>6} {'LFW':>5} {'kiosk':>6}  licence"
    )
    for name, _, licence, ident, mult, fp, lfw_m, kio, _, sized in rows:
        print(f"{name:<16} {ident:>8} {mult:>6} {sized:>8} {fp:>6} {lfw_m:>5} {kio:>6}  {licence}")
    print(
        f"(misses out of: identity {len(identity)} photos, multi {sum(int(r['faces']) for r in counted)} "
        f"counted faces (multi≥40: {sum(map(len, multi_reference))} MTCNN faces at least 40 px wide), "
        f"negatives {len(negatives)} photos, LFW {len(lfw_images)} photos, kiosk {len(kiosk)} crops)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
