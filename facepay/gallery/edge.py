"""Face gallery in-process over qdrant-edge-py (Qdrant's own engine: HNSW, payload indexes, WAL).

Layout: one Edge shard directory per model id, ``<path>/<collection_name(model_id)>/``
(e.g. ``<path>/faces__dlib-resnet-v1/``), so vectors of two models never mix.

**One process owns a shard.** Opening a shard takes the lock on its write-ahead log; a second
opener (another process, or a second `EdgeGallery` on the same path in this process) fails
with `ShardBusyError`. In facepay the recognizer that owns the gallery therefore does all
writes (enrollment, deletion) as well as the searches; other processes send it requests
instead of opening the directory. Within the owning process an `EdgeGallery` is safe to share
between threads.

Durability: every write goes to the shard's WAL first and is replayed on the next open after
a process crash; `close` flushes the segments.

Indexing: nothing optimises in the background. New points land in an appendable segment
searched by brute force (measured ~0.7 ms p50 at 10k x 128, ~12 ms at 100k x 128 on 2 cores).
`optimize` builds the HNSW index (and the int8 quantized vectors) once a segment passes the
indexing threshold. qdrant-edge's ``optimize`` holds the GIL for the whole build (measured: a
Python thread got no time slice for the 42 s of a 30k build), which would stall every payment
search of the owning process; so `optimize` builds **in a child process on a copy** of the shard
and swaps the built copy in, replaying the writes made meanwhile. Searches keep running on the
old shard during the build; the swap itself pauses them for the time it takes to open the built
shard (see README "Measured").

Tuning (`facepay.config.QdrantTuning`, settings ``qdrant.*``): HNSW m / ef_construct /
full-scan threshold / build threads, int8 scalar quantization (quantized vectors pinned in RAM,
originals memory-mapped from disk, rescored), payload on disk, apply when a shard is created;
``hnsw_ef`` and ``oversampling`` on every search.

Layout after a build: the shard lives in ``<path>/<collection>@<generation>/`` and the text
file ``<path>/<collection>.current`` names it (written atomically after the built shard holds
every write); a gallery that was never built keeps ``<path>/<collection>/``.

Distinct users per search: Edge has no group-by, so the search over-fetches points and keeps
the best point per user, widening the fetch until it has ``limit`` users or has seen every
matching point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from facepay.config import QdrantTuning

from .base import (
    INDEXED_FIELDS,
    GalleryError,
    Hit,
    Template,
    UnknownModelError,
    as_vector,
    check_dim,
    check_kind,
    check_limit,
    collection_name,
    dedupe_hits,
    point_ids_for,
)

__all__ = ["EdgeGallery", "ShardBusyError"]

_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge at EdgeShard.create
_SCROLL_PAGE = 1024
_OVERFETCH = 8  # points fetched per wanted user on the first try
_BUILD_TIMEOUT_S = 6 * 3600  # a build child that runs longer is killed and the build fails
# Flush after this many written points: a flush holds the GIL for time proportional to what is
# unflushed (200k points: 0.37 s; 2,048: 15 ms), and the build's copy starts with one.
_FLUSH_EVERY_POINTS = 8192


class ShardBusyError(GalleryError):
    """The shard is open elsewhere: one process (one EdgeGallery) owns an Edge shard."""


def _filter(
    user_id: str | None = None,
    tenant: str | None = None,
    phone_suffix: str | None = None,
    kind: str | None = None,
) -> qe.Filter | None:
    must: list[Any] = [
        qe.FieldCondition(key=key, match=qe.MatchValue(value))
        for key, value in (("user_id", user_id), ("tenant", tenant), ("phone_suffix", phone_suffix), ("kind", kind))
        if value is not None
    ]
    return qe.Filter(must=must) if must else None


def _user_filter(user_id: str) -> qe.Filter:
    """Exactly one user's points: what a delete is scoped by (a None filter would match every point)."""
    return qe.Filter(must=[qe.FieldCondition(key="user_id", match=qe.MatchValue(user_id))])


def _read_dim(shard_dir: Path) -> int:
    """Vector size of an existing shard, from the config qdrant-edge persists beside it."""
    try:
        config = json.loads((shard_dir / _CONFIG_FILE).read_text())
        params = config["vectors"][""]
        if params.get("distance") != "Cosine":
            raise ValueError(f"shard {shard_dir} uses {params.get('distance')} distance, expected Cosine")
        return int(params["size"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise GalleryError(f"cannot read the vector size of Edge shard {shard_dir}: {exc!r}") from exc


class _Shard:
    """One model's open shard. ``lock`` serialises writes; ``readers`` counts searches running on
    ``shard`` so a swap closes the old shard only after they finish."""

    __slots__ = ("build_lock", "dim", "directory", "lock", "pending", "readers", "reading", "shard", "unflushed")

    def __init__(self, shard: qe.EdgeShard, dim: int, directory: Path) -> None:
        self.shard = shard
        self.dim = dim
        self.directory = directory
        self.lock = threading.Lock()  # serialises writes (count-then-delete must be atomic)
        self.build_lock = threading.Lock()  # one index build at a time
        self.readers = threading.Condition()
        self.reading: dict[int, int] = {}  # id(EdgeShard) -> reads running on it (under ``readers``)
        self.pending: list[qe.UpdateOperation] | None = None  # writes made while a copy is built
        self.unflushed = 0  # points written since the last flush

    def write(self, op: qe.UpdateOperation, points: int = 1) -> None:
        """Apply a write (caller holds ``lock``); remembered for the copy being built, if any."""
        self.shard.update(op)
        if self.pending is not None:
            self.pending.append(op)
        self.unflushed += points
        if self.unflushed >= _FLUSH_EVERY_POINTS:
            self.shard.flush()
            self.unflushed = 0


class _Reading:
    """Context of one read: the shard current when it started, kept open until it ends."""

    __slots__ = ("s", "shard")

    def __init__(self, s: _Shard) -> None:
        self.s = s

    def __enter__(self) -> qe.EdgeShard:
        with self.s.readers:
            self.shard = self.s.shard
            self.s.reading[id(self.shard)] = self.s.reading.get(id(self.shard), 0) + 1
        return self.shard

    def __exit__(self, *exc: object) -> None:
        with self.s.readers:
            self.s.reading[id(self.shard)] -= 1
            self.s.readers.notify_all()


def _current_dir(root: Path, name: str) -> Path:
    """The shard directory of collection ``name``: the last build's, else ``<root>/<name>``."""
    pointer = root / f"{name}.current"
    if pointer.exists():
        return root / pointer.read_text().strip()
    return root / name


def _remove_unfinished_builds(root: Path, name: str, keep: Path) -> None:
    """Copies of a build that never became current (its owner stopped during the build)."""
    for stale in root.glob(f"{name}@*"):
        if stale != keep and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _edge_config(dim: int, tuning: QdrantTuning, max_search_threads: int | None) -> qe.EdgeConfig:
    """A new shard's configuration from the tuning settings (see `QdrantTuning`)."""
    quantization = (
        qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
        if tuning.quantization == "int8"
        else None
    )
    vectors = qe.EdgeVectorParams(
        size=dim,
        distance=qe.Distance.Cosine,
        quantization_config=quantization,
        memory=qe.Memory.Cold if tuning.vectors_on_disk else qe.Memory.Cached,
    )
    hnsw = qe.HnswIndexConfig(
        m=tuning.hnsw_m,
        ef_construct=tuning.hnsw_ef_construct,
        full_scan_threshold=tuning.full_scan_threshold_kb,
        max_indexing_threads=tuning.indexing_threads,
        payload_m=0,  # no extra graph per keyword value: small filters are scanned (full_scan_threshold)
    )
    return qe.EdgeConfig(
        vectors=vectors,
        hnsw_config=hnsw,
        max_search_threads=max_search_threads,
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=tuning.indexing_threshold_kb),
        payload_memory=qe.Memory.Cold if tuning.payload_on_disk else qe.Memory.Cached,
    )


def search_params(tuning: QdrantTuning) -> qe.SearchParams:
    quantization = (
        qe.QuantizationSearchParams(rescore=True, oversampling=tuning.oversampling)
        if tuning.quantization == "int8"
        else None
    )
    return qe.SearchParams(hnsw_ef=tuning.hnsw_ef, quantization=quantization)


class EdgeGallery:
    """Gallery stored under ``path`` (created if missing), one Edge shard per model id."""

    def __init__(
        self, path: str | Path, *, max_search_threads: int | None = None, tuning: QdrantTuning | None = None
    ) -> None:
        self._root = Path(path).expanduser()
        self._root.mkdir(parents=True, exist_ok=True)
        self._max_search_threads = max_search_threads
        self._tuning = tuning or QdrantTuning()
        self._search_params = search_params(self._tuning)
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- shards -----------------------------------------------------------------------------

    def _config(self, dim: int | None) -> qe.EdgeConfig | None:
        if dim is None:  # load as persisted (index and storage settings are fixed at creation)
            return (
                None if self._max_search_threads is None else qe.EdgeConfig(max_search_threads=self._max_search_threads)
            )
        return _edge_config(dim, self._tuning, self._max_search_threads)

    def _get(self, model_id: str, create_dim: int | None = None) -> _Shard | None:
        """The model's open shard: opened from disk if present, created if ``create_dim`` is given,
        else None."""
        name = collection_name(model_id)
        with self._lock:
            if self._closed:
                raise GalleryError("EdgeGallery is closed")
            s = self._shards.get(name)
            if s is not None:
                return s
            shard_dir = _current_dir(self._root, name)
            exists = (shard_dir / _CONFIG_FILE).exists()
            if not exists and create_dim is None:
                return None
            dim = _read_dim(shard_dir) if exists else create_dim
            assert dim is not None  # read from the shard, or the one it is created with
            _remove_unfinished_builds(self._root, name, keep=shard_dir)
            try:
                if exists:
                    shard = qe.EdgeShard.load(str(shard_dir), self._config(None))
                else:
                    shard = qe.EdgeShard.create(
                        str(shard_dir), _edge_config(dim, self._tuning, self._max_search_threads)
                    )
            except Exception as exc:  # qdrant-edge raises bare Exception
                if "WouldBlock" in str(exc) or "lock" in str(exc).lower():
                    raise ShardBusyError(
                        f"Edge shard {shard_dir} is open in another process or gallery; one process owns a shard"
                    ) from exc
                raise GalleryError(f"cannot open Edge shard {shard_dir}: {exc}") from exc
            try:
                present = set(shard.info().payload_schema)
                for field in INDEXED_FIELDS:
                    if field not in present:
                        params = (
                            qe.KeywordIndexParams(is_tenant=True) if field == "tenant" else qe.PayloadSchemaType.Keyword
                        )
                        shard.update(qe.UpdateOperation.create_field_index(field, params))
            except BaseException:
                shard.close()
                raise
            s = self._shards[name] = _Shard(shard, dim, shard_dir)
            return s

    def _require(self, model_id: str) -> _Shard:
        s = self._get(model_id)
        if s is None:
            raise UnknownModelError(
                f"no Edge shard {collection_name(model_id)!r} for model {model_id!r} under {self._root}; "
                "call ensure_collection first"
            )
        return s

    def ensure_collection(self, model_id: str, dim: int) -> None:
        dim = check_dim(dim)
        s = self._get(model_id, create_dim=dim)
        assert s is not None
        if s.dim != dim:
            raise ValueError(
                f"Edge shard {collection_name(model_id)!r} for model {model_id!r} holds {s.dim}-d vectors, not {dim}-d"
            )

    # -- writes -----------------------------------------------------------------------------

    def upsert(self, model_id: str, templates: list[Template]) -> None:
        s = self._require(model_id)
        # Lists convert faster than numpy arrays into qdrant-edge points (measured 2x).
        points = [
            qe.Point(pid, vec.tolist(), payload) for pid, vec, payload in point_ids_for(model_id, templates, s.dim)
        ]
        # qdrant-edge holds the GIL while it applies an update: bounded chunks let searches in
        # between during a bulk enrollment (each chunk is idempotent, so a retry is safe).
        batch = self._tuning.upsert_batch
        for start in range(0, len(points), batch):
            with s.lock:
                chunk = points[start : start + batch]
                s.write(qe.UpdateOperation.upsert_points(chunk), len(chunk))

    def delete_user(self, model_id: str, user_id: str) -> int:
        s = self._get(model_id)
        if s is None:
            return 0
        flt = _user_filter(user_id)
        with s.lock:
            n = s.shard.count(qe.CountRequest(exact=True, filter=flt))
            if n:
                s.write(qe.UpdateOperation.delete_points_by_filter(flt))
        return int(n)

    # -- reads ------------------------------------------------------------------------------

    def search(
        self,
        model_id: str,
        vector: np.ndarray,
        limit: int = 2,
        tenant: str | None = None,
        phone_suffix: str | None = None,
        kind: str | None = "mean",
    ) -> list[Hit]:
        limit = check_limit(limit)
        check_kind(kind)
        s = self._require(model_id)
        query = qe.Query.Nearest(as_vector(vector, s.dim, what="query vector").tolist())
        flt = _filter(tenant=tenant, phone_suffix=phone_suffix, kind=kind)
        fetch = limit * _OVERFETCH
        while True:
            with _Reading(s) as shard:
                points = shard.query(
                    qe.QueryRequest(
                        limit=fetch,
                        query=query,
                        filter=flt,
                        with_payload=["user_id", "tenant"],
                        with_vector=False,
                        params=self._search_params,
                    )
                )
            hits = dedupe_hits((p.score, p.payload or {}) for p in points)
            if len(hits) >= limit or len(points) < fetch:
                return hits[:limit]
            fetch *= 4  # many points of few users: widen until `limit` users or every point is seen

    def _payloads(self, model_id: str, flt: qe.Filter | None) -> Iterator[dict]:
        """Every matching point's payload, page by page (no vectors)."""
        s = self._get(model_id)
        if s is None:
            return
        offset = None
        while True:
            with _Reading(s) as shard:
                records, offset = shard.scroll(
                    qe.ScrollRequest(
                        offset=offset, limit=_SCROLL_PAGE, filter=flt, with_payload=True, with_vector=False
                    )
                )
            yield from (dict(r.payload) for r in records if r.payload)
            if offset is None:
                return

    def list_users(self, model_id: str, tenant: str | None = None) -> list[str]:
        return sorted({p["user_id"] for p in self._payloads(model_id, _filter(tenant=tenant)) if "user_id" in p})

    def describe_user(self, model_id: str, user_id: str) -> list[dict]:
        """Payloads of every template of the user (no vectors)."""
        return list(self._payloads(model_id, _filter(user_id=user_id)))

    def count(self, model_id: str) -> int:
        s = self._get(model_id)
        if s is None:
            return 0
        with _Reading(s) as shard:
            return int(shard.count(qe.CountRequest(exact=True)))

    # -- maintenance and lifecycle ----------------------------------------------------------

    def optimize(self, model_id: str) -> bool:
        """Build the HNSW index (and quantized vectors) of segments past the indexing threshold,
        in a child process on a copy of the shard, then swap the copy in (module docstring).
        Blocks the caller for the build; searches and writes go on meanwhile. True if anything
        was optimised. GalleryError if the build fails (the shard in use is left as it was)."""
        s = self._require(model_id)
        name = collection_name(model_id)
        with s.build_lock:
            generation = time.time_ns()
            build_dir = self._root / f"{name}@{generation}"
            with s.lock:  # no write between the flush and the copy
                s.shard.flush()
                s.unflushed = 0
                shutil.copytree(s.directory, build_dir, ignore=shutil.ignore_patterns("*.lock"))
                s.pending = []
            try:
                optimized = _build_in_child(build_dir)
            except BaseException:
                with s.lock:
                    s.pending = None
                shutil.rmtree(build_dir, ignore_errors=True)
                raise
            if not optimized:
                with s.lock:
                    s.pending = None
                shutil.rmtree(build_dir, ignore_errors=True)
                return False
            self._swap_in(s, name, build_dir)
            return True

    def _swap_in(self, s: _Shard, name: str, build_dir: Path) -> None:
        """Open the built copy, replay the writes made during the build, make it current."""
        with s.lock:  # writes wait; searches go on against the old shard until the swap
            try:
                built = qe.EdgeShard.load(str(build_dir), self._config(None))
                for op in s.pending or []:
                    built.update(op)
                built.flush()
            except Exception as exc:
                s.pending = None
                shutil.rmtree(build_dir, ignore_errors=True)
                raise GalleryError(f"cannot open the built shard {build_dir}: {exc}") from exc
            s.pending = None
            pointer = self._root / f"{name}.current"
            tmp = pointer.with_suffix(".current.tmp")
            tmp.write_text(build_dir.name)
            os.replace(tmp, pointer)  # from here on a restart opens the built shard
            with s.readers:
                old, old_dir = s.shard, s.directory
                s.shard, s.directory = built, build_dir
                while s.reading.get(id(old), 0):
                    s.readers.wait()
                s.reading.pop(id(old), None)
            old.close()
        shutil.rmtree(old_dir, ignore_errors=True)

    def flush(self) -> None:
        with self._lock:
            for s in self._shards.values():
                s.shard.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = list(self._shards.values()), {}
        errors = []
        for s in shards:
            with s.lock:
                for step in (s.shard.flush, s.shard.close):
                    try:
                        step()
                    except Exception as exc:  # noqa: BLE001 - qdrant-edge raises bare Exception; keep closing the other shards
                        errors.append(exc)
        if errors:
            raise GalleryError(f"closing Edge shards failed: {errors}")

    def __enter__(self) -> EdgeGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _build_in_child(shard_dir: Path) -> bool:
    """Optimise the shard copy in ``shard_dir`` in a child process (`facepay.gallery.edge_build`)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])
        ),
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "facepay.gallery.edge_build", str(shard_dir)],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise GalleryError(f"index build of {shard_dir} took over {_BUILD_TIMEOUT_S} s and was stopped") from exc
    if done.returncode != 0:
        raise GalleryError(f"index build of {shard_dir} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    try:
        return bool(json.loads(done.stdout.strip().splitlines()[-1])["optimized"])
    except (IndexError, KeyError, json.JSONDecodeError) as exc:
        raise GalleryError(f"index build of {shard_dir} gave no result: {done.stdout[-500:]!r}") from exc
