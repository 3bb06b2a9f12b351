"""What an enrollment leaves behind: the user's templates in the gallery, and the aligned face
chips they were computed from, so that a new recognizer model can be re-indexed without
asking every customer to enrol again. Both are erased together when the user is deleted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import redis

from facepay.config import Settings
from facepay.gallery import Gallery, Template
from facepay.messages import PosedMsg
from facepay.vocabulary import Reason


def quality_problem(face: PosedMsg, settings: Settings) -> Reason | None:
    """Why an enrollment photo's face may not become part of a template, if it may not: a
    template is only as good as its photos — large, sharp and (weakly) live enough."""
    if face.face_px < settings.enroll_min_face_px:
        return Reason.FACE_TOO_SMALL
    if face.sharpness < settings.enroll_min_sharpness:
        return Reason.BLURRY
    if face.antispoof is not None and face.antispoof < settings.enroll_min_antispoof:
        return Reason.SPOOF_SUSPECTED
    return None


def mean_template(samples: np.ndarray) -> np.ndarray:
    """The seed's template: the L2-normalised mean of the accepted embeddings."""
    mean = np.asarray(samples, dtype=np.float32).mean(axis=0)
    return mean / (np.linalg.norm(mean) + 1e-12)


def store_templates(
    gallery: Gallery, space: str, user_id: str, tenant: str, phone_suffix: str, samples: np.ndarray
) -> int:
    """Replace the user's templates in `space`: the mean, and every sample."""
    samples = np.asarray(samples, dtype=np.float32)
    common: dict[str, Any] = {
        "user_id": user_id,
        "tenant": tenant or "default",
        "phone_suffix": phone_suffix or None,
        "enrolled_at_ms": int(time.time() * 1000),
    }
    gallery.ensure_collection(space, samples.shape[1])
    gallery.delete_user(space, user_id)
    templates = [Template(vector=mean_template(samples), kind="mean", **common)]
    templates += [Template(vector=s / (np.linalg.norm(s) + 1e-12), kind="sample", **common) for s in samples]
    gallery.upsert(space, templates)
    return len(templates)


class FaceSources:
    """`{ns}:faces:{user}`: the accepted enrollment chips (PNG, per chip template) and the
    user's tenant and phone suffix. Biometric data: kept only for re-indexing, erased on delete."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    def _key(self, user_id: str) -> str:
        return self.settings.key("faces", user_id)

    def save(self, user_id: str, tenant: str, phone_suffix: str, chips: list[dict[str, bytes]]) -> None:
        record = {"tenant": tenant, "phone_suffix": phone_suffix, "chips": chips}
        self.redis.set(self._key(user_id), msgpack.packb(record))

    def load(self, user_id: str) -> dict | None:
        raw = self.redis.get(self._key(user_id))
        return msgpack.unpackb(raw) if raw else None

    def delete(self, user_id: str) -> int:
        return self.redis.delete(self._key(user_id))

    def users(self) -> Iterator[str]:
        prefix = self._key("")
        for key in self.redis.scan_iter(match=prefix + "*", count=500):
            yield key.decode()[len(prefix) :]
