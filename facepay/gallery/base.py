"""The face gallery interface: enrolled face templates, searched 1:N by cosine similarity.

One collection per embedding model (see `collection_name`), so vectors of two models never
mix. Every point carries the payload ``user_id, tenant, kind, index, phone_suffix,
enrolled_at_ms``; ``user_id, tenant, kind, phone_suffix`` are keyword-indexed.

A ``user_id`` is global within one model's collection: point ids do not include the tenant,
so enrolling the same ``user_id`` under another tenant overwrites the earlier templates.

Point ids are deterministic (`point_id`), so upserting the same ``(user_id, kind, index)``
again overwrites instead of duplicating. ``index`` is not a `Template` field: it is the
position of the template among the templates of the same ``(user_id, kind)`` within one
`Gallery.upsert` call (a user's "mean" template is index 0; samples are 0, 1, 2, ...).
Re-enrolling with fewer samples than before leaves the old extra samples in place, so a full
re-enrollment is ``delete_user`` followed by ``upsert``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "COLLECTION_PREFIX",
    "INDEXED_FIELDS",
    "KINDS",
    "Gallery",
    "GalleryError",
    "Hit",
    "Template",
    "UnknownModelError",
    "as_vector",
    "check_dim",
    "check_kind",
    "check_limit",
    "collection_name",
    "dedupe_hits",
    "point_id",
    "point_ids_for",
    "template_payload",
]

COLLECTION_PREFIX = "faces__"
KINDS = frozenset({"mean", "sample"})
INDEXED_FIELDS = ("user_id", "tenant", "kind", "phone_suffix")  # keyword payload indexes

# Fixed namespace for point ids: changing it would orphan every enrolled template.
_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/facepay/facepay/gallery/point")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 100  # well under Qdrant's 255 and any filesystem's name limit


class GalleryError(Exception):
    """Base class of gallery errors (bad input is reported as ValueError instead)."""


class UnknownModelError(GalleryError, LookupError):
    """The model's collection does not exist: call `Gallery.ensure_collection` first."""


@dataclass(frozen=True)
class Template:
    user_id: str
    vector: np.ndarray  # L2-normalised
    tenant: str  # store or tenant id
    kind: str = "mean"  # "mean" template or "sample" (individual enrollment embeddings are kept too)
    phone_suffix: str | None = None
    enrolled_at_ms: int = 0


@dataclass(frozen=True)
class Hit:
    user_id: str
    score: float  # cosine similarity
    tenant: str


@runtime_checkable
class Gallery(Protocol):
    def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the model's collection if missing; ValueError if it exists with another dim."""
        ...

    def upsert(self, model_id: str, templates: list[Template]) -> None:
        """Write templates; idempotent per (user_id, kind, index). ValueError on a wrong dim."""
        ...

    def search(
        self,
        model_id: str,
        vector: np.ndarray,
        limit: int = 2,
        tenant: str | None = None,
        phone_suffix: str | None = None,
        kind: str | None = "mean",
    ) -> list[Hit]:
        """Best first, one hit per distinct user (its best-scoring point). kind=None: any kind."""
        ...

    def delete_user(self, model_id: str, user_id: str) -> int:
        """Remove every template of the user (all kinds); idempotent; returns points removed."""
        ...

    def list_users(self, model_id: str, tenant: str | None = None) -> list[str]:
        """Distinct enrolled user ids, sorted."""
        ...

    def describe_user(self, model_id: str, user_id: str) -> list[dict]:
        """Payloads of every template of the user (no vectors); [] when unknown."""
        ...

    def count(self, model_id: str) -> int:
        """Number of points (templates of all kinds) in the model's collection."""
        ...

    def close(self) -> None: ...


def collection_name(model_id: str) -> str:
    """``faces__<model_id>`` for ids made of ``[A-Za-z0-9._-]``; other ids are sanitised and get a
    short hash suffix, so two distinct model ids never share a collection."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    safe = _UNSAFE.sub("-", model_id)
    if safe != model_id or len(safe) > _MAX_NAME:
        digest = hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[: _MAX_NAME - 11]}-{digest}"
    return COLLECTION_PREFIX + safe


def point_id(model_id: str, user_id: str, kind: str, index: int) -> str:
    """Deterministic point id: uuid5 over (model_id, user_id, kind, index)."""
    key = json.dumps([model_id, user_id, kind, int(index)], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(_POINT_NAMESPACE, key))


def check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


def as_vector(vector: np.ndarray, dim: int, what: str = "vector") -> np.ndarray:
    """A 1-D finite non-zero float32 vector of exactly ``dim`` values, else ValueError."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != dim:
        raise ValueError(f"{what} has dimension {arr.shape[0]}, but this collection holds {dim}-d vectors")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinity")
    if not float(np.dot(arr, arr)) > 0.0:
        raise ValueError(f"{what} is all zeros")
    return arr


def _check_template(t: Template) -> None:
    if not isinstance(t, Template):
        raise TypeError(f"expected Template, got {type(t).__name__}")
    if not isinstance(t.user_id, str) or not t.user_id:
        raise ValueError(f"Template.user_id must be a non-empty string, got {t.user_id!r}")
    if not isinstance(t.tenant, str) or not t.tenant:
        raise ValueError(f"Template.tenant must be a non-empty string (user {t.user_id!r})")
    if t.kind not in KINDS:
        raise ValueError(f"Template.kind must be one of {sorted(KINDS)}, got {t.kind!r}")
    if t.phone_suffix is not None and not isinstance(t.phone_suffix, str):
        raise ValueError(f"Template.phone_suffix must be a string or None, got {t.phone_suffix!r}")


def check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or None, got {kind!r}")


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return int(limit)


def template_payload(t: Template, index: int) -> dict:
    return {
        "user_id": t.user_id,
        "tenant": t.tenant,
        "kind": t.kind,
        "index": index,
        "phone_suffix": t.phone_suffix,
        "enrolled_at_ms": int(t.enrolled_at_ms),
    }


def point_ids_for(model_id: str, templates: Iterable[Template], dim: int) -> list[tuple[str, np.ndarray, dict]]:
    """Validate every template (before anything is written) and give each its (id, vector, payload)."""
    out: list[tuple[str, np.ndarray, dict]] = []
    seen: dict[tuple[str, str], int] = {}
    for t in templates:
        _check_template(t)
        vec = as_vector(t.vector, dim, what=f"vector of user {t.user_id!r} ({t.kind})")
        index = seen.get((t.user_id, t.kind), 0)
        seen[(t.user_id, t.kind)] = index + 1
        out.append((point_id(model_id, t.user_id, t.kind, index), vec, template_payload(t, index)))
    return out


def dedupe_hits(scored: Iterable[tuple[float, dict]]) -> list[Hit]:
    """Best point per user, best first. ``scored`` holds (score, payload) pairs in any order."""
    best: dict[str, Hit] = {}
    for score, payload in scored:
        user = payload.get("user_id")
        if user is None:
            continue
        s = float(score)
        if math.isnan(s):
            continue
        prev = best.get(user)
        if prev is None or s > prev.score:
            best[user] = Hit(user_id=user, score=s, tenant=payload.get("tenant") or "")
    return sorted(best.values(), key=lambda h: (-h.score, h.user_id))
