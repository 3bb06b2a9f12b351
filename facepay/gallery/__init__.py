"""Face gallery: enrolled face templates per embedding model, searched 1:N by cosine similarity.

``open_gallery(url)`` picks the backend:

- ``edge:///abs/dir`` (or ``edge://rel/dir``) -> `EdgeGallery`, in-process qdrant-edge shards
  (one owning process);
- ``qdrant+local:///abs/dir`` or ``:memory:`` -> `QdrantGallery` in qdrant-client's local mode;
- ``http://host:6333`` / ``https://…`` -> `QdrantGallery` on a Qdrant server; the API key, if
  any, comes from ``QDRANT_API_KEY``.

The backends are imported on first use, so using one does not import the other's client.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from facepay.config import QdrantTuning

from .base import (
    KINDS,
    Gallery,
    GalleryError,
    Hit,
    Template,
    UnknownModelError,
    collection_name,
    point_id,
)

if TYPE_CHECKING:
    from .edge import EdgeGallery, ShardBusyError
    from .qdrant_server import GalleryUnavailableError, QdrantGallery

__all__ = [
    "KINDS",
    "EdgeGallery",
    "Gallery",
    "GalleryError",
    "GalleryUnavailableError",
    "Hit",
    "QdrantGallery",
    "ShardBusyError",
    "Template",
    "UnknownModelError",
    "collection_name",
    "open_gallery",
    "point_id",
    "wait_until_reachable",
]

_LAZY = {
    "EdgeGallery": ".edge",
    "ShardBusyError": ".edge",
    "QdrantGallery": ".qdrant_server",
    "GalleryUnavailableError": ".qdrant_server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


def _after(url: str, scheme: str) -> str:
    rest = url[len(scheme) :]
    if not rest:
        raise ValueError(f"gallery URL {url!r} has no directory")
    return rest


def wait_until_reachable(gallery: Gallery, within_s: float) -> None:
    """Wait for a gallery served by another process (a Qdrant server) to answer, within_s at most;
    an in-process gallery (edge, qdrant-client local mode) answers at once."""
    wait = getattr(gallery, "wait_until_reachable", None)
    if wait is not None:
        wait(within_s)


def open_gallery(url: str, tuning: QdrantTuning | None = None) -> Gallery:
    """The gallery a URL names (see the module docstring); ValueError on anything else."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"gallery URL must be a non-empty string, got {url!r}")
    if url.startswith("edge://"):
        from .edge import EdgeGallery

        return EdgeGallery(_after(url, "edge://"), tuning=tuning)
    if url == ":memory:":
        from .qdrant_server import QdrantGallery

        return QdrantGallery(location=":memory:")
    if url.startswith("qdrant+local://"):
        from .qdrant_server import QdrantGallery

        rest = _after(url, "qdrant+local://")
        return QdrantGallery(location=":memory:") if rest in (":memory:", "/:memory:") else QdrantGallery(path=rest)
    if url.startswith(("http://", "https://")):
        from .qdrant_server import QdrantGallery

        return QdrantGallery(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None, tuning=tuning)
    raise ValueError(
        f"unsupported gallery URL {url!r}: use edge:///dir, qdrant+local:///dir, :memory:, http://… or https://…"
    )
