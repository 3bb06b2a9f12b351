"""Face gallery over `qdrant_client.QdrantClient`.

``QdrantGallery(url="http://qdrant:6333")`` talks to a Qdrant server (production: several
processes may read and write). ``QdrantGallery(location=":memory:")`` or
``QdrantGallery(path="/dir")`` use qdrant-client's local mode: the same API in-process, an
exact (brute-force) numpy search, payload indexes accepted but without effect, and, with a
path, a lock file so one process owns the directory (and SQLite's same-thread check, unless
``force_disable_check_same_thread=True`` is passed through). Local mode evaluates filters
point by point in Python (a filtered search over 10k points takes hundreds of ms), so it is
for tests and small tools; an in-process production gallery is `facepay.gallery.edge`.

On a server the collection is created for a cluster and tuned from `facepay.config.QdrantTuning`
(settings ``qdrant.*``): ``shard_number``, ``replication_factor``, ``write_consistency_factor``;
HNSW m / ef_construct / full-scan threshold / build threads; int8 scalar quantization kept in RAM
with the original vectors on disk and rescored; payload on disk. The server builds its index in
its own optimizer threads, so searches are not held up by enrollment writes.

A request that meets a connection error, a timeout or a 502/503/504 (a node restarting, a shard
moving) is retried ``qdrant.retries`` times, waiting ``qdrant.retry_backoff_s`` doubling; then
`GalleryUnavailableError` names the server, the attempts and the last cause. Every request is
safe to repeat: point ids are deterministic, deletes are by filter, searches read.

Distinct users per search come from the server's grouping (`query_points_groups`,
``group_by="user_id", group_size=1``), so samples of one user never crowd out the
second-best user.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

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

__all__ = ["GalleryUnavailableError", "QdrantGallery", "is_transient"]

log = logging.getLogger(__name__)
_SCROLL_PAGE = 1024
_RETRY_STATUS = frozenset({502, 503, 504})  # a node or a shard replica briefly away
T = TypeVar("T")


class GalleryUnavailableError(GalleryError):
    """The Qdrant server did not answer within the retry bound (``qdrant.retries``)."""


def is_transient(exc: BaseException) -> bool:
    """A failure worth another attempt: the connection, a timeout, or a node briefly away."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in _RETRY_STATUS
    return isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError, TimeoutError))


def _filter(
    user_id: str | None = None,
    tenant: str | None = None,
    phone_suffix: str | None = None,
    kind: str | None = None,
) -> qm.Filter | None:
    must: list[Any] = [
        qm.FieldCondition(key=key, match=qm.MatchValue(value=value))
        for key, value in (("user_id", user_id), ("tenant", tenant), ("phone_suffix", phone_suffix), ("kind", kind))
        if value is not None
    ]
    return qm.Filter(must=must) if must else None


def _user_filter(user_id: str) -> qm.Filter:
    """Exactly one user's points: what a delete is scoped by (a None filter would match every point)."""
    return qm.Filter(must=[qm.FieldCondition(key="user_id", match=qm.MatchValue(value=user_id))])


class QdrantGallery:
    """Gallery on a Qdrant server (``url``) or in qdrant-client's local mode (``location``/``path``)."""

    def __init__(
        self,
        url: str | None = None,
        path: str | None = None,
        location: str | None = None,
        *,
        api_key: str | None = None,
        timeout: int | None = None,
        tuning: QdrantTuning | None = None,
        **client_kwargs: Any,
    ) -> None:
        given = [name for name, value in (("url", url), ("path", path), ("location", location)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of url, path or location (got {given or 'none'})")
        self._local = path is not None or location == ":memory:"
        self._tuning = tuning or QdrantTuning()
        self._where = url or path or location
        if timeout is None and not self._local:
            timeout = max(1, round(self._tuning.timeout_s))
        self._client = QdrantClient(
            url=url,
            path=None if path is None else str(path),
            location=location,
            api_key=api_key,
            timeout=timeout,
            **client_kwargs,
        )
        self._url = url
        self._search_params = search_params(self._tuning)
        self._dims: dict[str, int] = {}  # collection name -> dim (immutable once created)
        self._lock = threading.Lock()
        self._closed = False

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on transient failures up to ``qdrant.retries`` times."""
        attempts = 1 if self._local else 1 + self._tuning.retries
        wait = self._tuning.retry_backoff_s
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if self._local or not is_transient(exc):
                    raise
                if attempt == attempts:
                    raise GalleryUnavailableError(
                        f"Qdrant at {self._where} did not answer {what} after {attempts} attempts over "
                        f"{time.monotonic() - started:.1f} s (qdrant.retries={self._tuning.retries}): {exc!r}"
                    ) from exc
                log.warning(
                    "Qdrant %s failed (attempt %d of %d), retrying in %.2f s: %r", what, attempt, attempts, wait, exc
                )
                time.sleep(wait)  # backoff between attempts at a server that is away
                wait *= 2
        raise AssertionError("unreachable")

    # -- collections ------------------------------------------------------------------------

    def _dim_of_existing(self, name: str) -> int | None:
        """The collection's vector size, None if it does not exist."""
        dim = self._dims.get(name)
        if dim is not None:
            return dim
        if not self._call("collection_exists", self._client.collection_exists, name):
            return None
        params = self._call("get_collection", self._client.get_collection, name).config.params.vectors
        if not isinstance(params, qm.VectorParams):
            raise ValueError(f"collection {name!r} uses named vectors; it was not created by the facepay gallery")
        if params.distance != qm.Distance.COSINE:
            raise ValueError(f"collection {name!r} uses {params.distance} distance, expected Cosine")
        self._dims[name] = int(params.size)
        return self._dims[name]

    def _dim(self, model_id: str) -> tuple[str, int]:
        name = collection_name(model_id)
        dim = self._dim_of_existing(name)
        if dim is None:
            raise UnknownModelError(
                f"no gallery collection {name!r} for model {model_id!r}; call ensure_collection first"
            )
        return name, dim

    def ensure_collection(self, model_id: str, dim: int) -> None:
        dim = check_dim(dim)
        name = collection_name(model_id)
        with self._lock:
            existing = self._dim_of_existing(name)
            if existing is None:
                try:
                    self._call(
                        "create_collection",
                        self._client.create_collection,
                        **collection_config(name, dim, self._tuning),
                    )
                except Exception:
                    # Another process may have created it between the check and the create.
                    if not self._call("collection_exists", self._client.collection_exists, name):
                        raise
                existing = self._dim_of_existing(name)
            if existing != dim:
                raise ValueError(f"collection {name!r} for model {model_id!r} holds {existing}-d vectors, not {dim}-d")
            self._ensure_payload_indexes(name)

    def _ensure_payload_indexes(self, name: str) -> None:
        """Create the keyword indexes the collection lacks (local mode keeps no schema: all, every time)."""
        present = set(self._call("get_collection", self._client.get_collection, name).payload_schema or {})
        with warnings.catch_warnings():
            if self._local:  # local mode accepts payload indexes but warns that they have no effect
                warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for field in INDEXED_FIELDS:
                if field in present:
                    continue
                schema: Any = (
                    qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True)
                    if field == "tenant"
                    else qm.PayloadSchemaType.KEYWORD
                )
                self._call(
                    "create_payload_index",
                    self._client.create_payload_index,
                    name,
                    field_name=field,
                    field_schema=schema,
                    wait=True,
                )

    # -- writes -----------------------------------------------------------------------------

    def upsert(self, model_id: str, templates: list[Template]) -> None:
        name, dim = self._dim(model_id)
        points = [
            qm.PointStruct(id=pid, vector=vec.tolist(), payload=payload)
            for pid, vec, payload in point_ids_for(model_id, templates, dim)
        ]
        batch = self._tuning.upsert_batch
        for start in range(0, len(points), batch):
            self._call("upsert", self._client.upsert, name, points=points[start : start + batch], wait=True)

    def delete_user(self, model_id: str, user_id: str) -> int:
        name = collection_name(model_id)
        if self._dim_of_existing(name) is None:
            return 0
        flt = _user_filter(user_id)
        n = self._call("count", self._client.count, name, count_filter=flt, exact=True).count
        if n:
            self._call("delete", self._client.delete, name, points_selector=qm.FilterSelector(filter=flt), wait=True)
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
        name, dim = self._dim(model_id)
        query = as_vector(vector, dim, what="query vector")
        result = self._call(
            "search",
            self._client.query_points_groups,
            name,
            group_by="user_id",
            query=query.tolist(),
            query_filter=_filter(tenant=tenant, phone_suffix=phone_suffix, kind=kind),
            limit=limit,
            group_size=1,
            with_payload=["user_id", "tenant"],
            search_params=None if self._local else self._search_params,
        )
        hits = dedupe_hits((h.score, h.payload or {}) for g in result.groups for h in g.hits)
        return hits[:limit]

    def _payloads(self, model_id: str, flt: qm.Filter | None) -> Iterator[dict]:
        """Every matching point's payload, page by page (no vectors)."""
        name = collection_name(model_id)
        if self._dim_of_existing(name) is None:
            return
        offset = None
        while True:
            records, offset = self._call(
                "scroll",
                self._client.scroll,
                name,
                scroll_filter=flt,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=False,
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
        name = collection_name(model_id)
        if self._dim_of_existing(name) is None:
            return 0
        return int(self._call("count", self._client.count, name, exact=True).count)

    @contextlib.contextmanager
    def bulk_load(self, model_id: str) -> Iterator[None]:
        """Defer the server's index build during a large load (``indexing_threshold=0``), then
        restore it so the server builds the index once, in its optimizer threads. Searches keep
        working meanwhile (unindexed points are scanned)."""
        name, _ = self._dim(model_id)
        if self._local:
            yield
            return
        self._call(
            "update_collection",
            self._client.update_collection,
            name,
            optimizers_config=qm.OptimizersConfigDiff(indexing_threshold=0),
        )
        try:
            yield
        finally:
            self._call(
                "update_collection",
                self._client.update_collection,
                name,
                optimizers_config=qm.OptimizersConfigDiff(indexing_threshold=self._tuning.indexing_threshold_kb),
            )

    # -- lifecycle --------------------------------------------------------------------------

    def wait_until_reachable(self, within_s: float, on_wait: Callable[[str], None] = lambda _reason: None) -> None:
        """A Qdrant server started after this process (a pod scheduled first) is waited for,
        within_s at most (then DependencyUnavailable); a refused API key fails at once.
        Local mode has nothing to wait for."""
        if self._local:
            return
        from facepay.redaction import redact_url
        from facepay.runtime.startup import wait_for

        wait_for(
            f"qdrant at {redact_url(self._url or '')}",
            self._client.get_collections,
            _server_unreachable,
            within_s,
            on_wait,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> QdrantGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _server_unreachable(exc: BaseException) -> bool:
    """Refused, timed out, or a proxy's 502/503/504 while the server starts: passing."""
    if isinstance(exc, ResponseHandlingException):
        return True
    return isinstance(exc, UnexpectedResponse) and exc.status_code in (502, 503, 504)


def collection_config(name: str, dim: int, tuning: QdrantTuning) -> dict[str, Any]:
    """`QdrantClient.create_collection` arguments of a gallery collection (see the module docstring)."""
    quantization = (
        qm.ScalarQuantization(
            scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
        if tuning.quantization == "int8"
        else None
    )
    return {
        "collection_name": name,
        "vectors_config": qm.VectorParams(size=dim, distance=qm.Distance.COSINE, on_disk=tuning.vectors_on_disk),
        "shard_number": tuning.shard_number,
        "replication_factor": tuning.replication_factor,
        "write_consistency_factor": tuning.write_consistency_factor,
        "on_disk_payload": tuning.payload_on_disk,
        "hnsw_config": qm.HnswConfigDiff(
            m=tuning.hnsw_m,
            ef_construct=tuning.hnsw_ef_construct,
            full_scan_threshold=tuning.full_scan_threshold_kb,
            max_indexing_threads=tuning.indexing_threads,
            payload_m=0,
        ),
        "quantization_config": quantization,
        "optimizers_config": qm.OptimizersConfigDiff(indexing_threshold=tuning.indexing_threshold_kb),
    }


def search_params(tuning: QdrantTuning) -> qm.SearchParams:
    quantization = (
        qm.QuantizationSearchParams(rescore=True, oversampling=tuning.oversampling)
        if tuning.quantization == "int8"
        else None
    )
    return qm.SearchParams(hnsw_ef=tuning.hnsw_ef, quantization=quantization)
