"""Does a detector change what the recognizer sees? Same photos, two detectors, same pipeline.

    .venv/bin/python bench/detector_recognition.py [--pairs 150] [--detectors mtcnn,scrfd-500m]

Runs `facepay.app.offline.FaceEmbedder` (the pipeline's own detector → crop → landmarks → chip →
recognizer, labelled mode) with each detector on the images of the first N same-person and N
different-person pairs of `faces-lfw/pairs.csv`, and prints per detector: images without a
usable face, best pair accuracy and the genuine/impostor score gap; and between the first
detector and each other: the cosine of the two embeddings of the same photo (1.0 = the
recognizer saw the same chip). The full LFW figures come from `facepay calibrate`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from facepay.app.offline import EmbeddedFace, FaceEmbedder
    from facepay.config import Settings
    from tests.conftest import read_rgb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FACEPAY_TEST_DATA", "../shared/data"))
    parser.add_argument("--pairs", type=int, default=150, help="same and different pairs each")
    parser.add_argument("--detectors", default="mtcnn,scrfd-500m")
    args = parser.parse_args(argv)

    root = Path(args.data) / "faces-lfw"
    with open(root / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    same = [r for r in rows if r["same"] == "1"][: args.pairs]
    different = [r for r in rows if r["same"] == "0"][: args.pairs]
    pairs = [(r["img1"], r["img2"], r["same"] == "1") for r in same + different]
    paths = sorted({p for a, b, _ in pairs for p in (a, b)})
    images = [read_rgb(root / p) for p in paths]
    index = {p: i for i, p in enumerate(paths)}

    vectors: dict[str, list[np.ndarray | None]] = {}
    for name in args.detectors.split(","):
        embedder = FaceEmbedder(Settings(device="cpu", detector_model=name), labelled=True)
        start = time.perf_counter()
        results = []
        for s in range(0, len(images), 16):
            results += embedder.embed_images(images[s : s + 16])
        seconds = time.perf_counter() - start
        vecs = [r.embedding if isinstance(r, EmbeddedFace) else None for r in results]
        vectors[name] = vecs
        scores = np.array(
            [
                float(vecs[index[a]] @ vecs[index[b]])
                if vecs[index[a]] is not None and vecs[index[b]] is not None
                else -np.inf
                for a, b, _ in pairs
            ]
        )
        truth = np.array([s for *_, s in pairs])
        best = max(((scores >= t) == truth).mean() for t in np.unique(scores[np.isfinite(scores)]))
        genuine, impostor = scores[truth & np.isfinite(scores)], scores[~truth & np.isfinite(scores)]
        print(
            f"{name:<16} {embedder.detector.model_id}: {len(images)} images in {seconds:.0f} s; "
            f"no usable face {sum(v is None for v in vecs)}; best accuracy {100 * best:.2f} % "
            f"({len(same)} + {len(different)} pairs); genuine median {np.median(genuine):.4f}, "
            f"impostor 99th pct {np.percentile(impostor, 99):.4f}",
            flush=True,
        )
    first, *others = args.detectors.split(",")
    for name in others:
        cos = np.array(
            [
                float(a @ b)
                for a, b in zip(vectors[first], vectors[name], strict=True)
                if a is not None and b is not None
            ]
        )
        print(
            f"same photo, {first} vs {name}: embedding cosine median {np.median(cos):.4f}, "
            f"5th pct {np.percentile(cos, 5):.4f}, min {cos.min():.4f} ({len(cos)} photos)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
