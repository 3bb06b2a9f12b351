"""Shared fixtures: the real-face data folders, found once, skipped with a reason when absent."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: one test process per core), models run in a test process
    get that process's share of the cores: torch's default, a thread per core in every process,
    oversubscribes the machine and its spinning threads slow each other down many times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _data_root() -> Path:
    return Path(os.environ.get("FACEPAY_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@dataclass(frozen=True)
class FaceData:
    """`faces/`: identities, pairs, landmarks, multi-face, negatives and videos (see its README)."""

    root: Path

    def manifest(self, kind: str | None = None) -> list[dict[str, str]]:
        with open(self.root / "MANIFEST.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def identities(self) -> dict[str, list[Path]]:
        people: dict[str, list[Path]] = {}
        for row in self.manifest("identity"):
            people.setdefault(row["identity"], []).append(self.root / row["path"])
        return {k: sorted(v) for k, v in sorted(people.items())}

    def pairs(self) -> list[tuple[Path, Path, bool]]:
        with open(self.root / "pairs.csv", newline="") as fh:
            return [(self.root / r["img1"], self.root / r["img2"], r["same"] == "1") for r in csv.DictReader(fh)]

    def path(self, relative: str) -> Path:
        return self.root / relative


def _require(folder: str) -> FaceData:
    root = _data_root() / folder
    if not (root / "MANIFEST.csv").exists():
        pytest.skip(f"real-face data not found at {root} (set FACEPAY_TEST_DATA to the folder holding {folder}/)")
    return FaceData(root)


@pytest.fixture(scope="session")
def faces() -> FaceData:
    return _require("faces")


@pytest.fixture(scope="session")
def faces_lfw() -> FaceData:
    return _require("faces-lfw")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as an RGB uint8 array (PNG alpha dropped)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real face that ships inside scikit-image (public-domain NASA photo)."""
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()
