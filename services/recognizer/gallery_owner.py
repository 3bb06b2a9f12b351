"""The gallery's owner: the one place that opens the gallery, searches it and writes it.

With the embedded gallery (qdrant-edge: one process owns its files) every write — an
enrollment's templates, a re-index job's, an operator's deletion — is done here, in the
recognizer. The owner also keeps what belongs to its template space: the session rule's numbers
(threshold, margin, k: setting > signed calibration > the model's default, re-read every
minute) and the vector index, which qdrant-edge builds only when asked.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis

from facepay import thresholds
from facepay.config import Settings
from facepay.gallery import Gallery, Hit, open_gallery, wait_until_reachable
from facepay.keys import load_trusted
from facepay.models.registry import RecognizerDefaults
from services.recognizer.enrollment import FaceSources, store_templates
from services.recognizer.policy import RuleInForce

log = logging.getLogger(__name__)

RULE_CHECK_EVERY_S = 60
OPTIMIZE_EVERY_S = 600


class GalleryOwner:
    """The gallery of one template space (recognizer model + the landmarks its chips were aligned
    with), every space that holds users (so that a deletion reaches all of them), the enrollment
    chips kept for re-indexing, and the rule in force for this space."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        gallery: Gallery,
        space_id: str,
        calibrated: thresholds.CalibratedThreshold,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.gallery = gallery
        self.space_id = space_id
        self.face_sources = FaceSources(client, settings)
        self.remember_space(space_id)
        # Only thresholds the operator signed count (facepay/thresholds.py).
        self.calibrated = calibrated
        self._space_rule: thresholds.SpaceRule | None = None
        self.in_force = self._read_rule()
        self._last_rule_check = self._last_optimize = time.monotonic()
        self._optimizer: threading.Thread | None = None

    @classmethod
    def open(
        cls,
        settings: Settings,
        client: redis.Redis,
        space_id: str,
        dim: int,
        model_threshold: float,
        defaults: RecognizerDefaults,
        gallery: Gallery | None = None,
    ) -> GalleryOwner:
        """Open (or take) the gallery and make sure this space's collection exists."""
        opened = gallery is None
        gallery = gallery or open_gallery(settings.gallery_url, tuning=settings.qdrant)
        try:
            # A Qdrant server may start after us (a SIGTERM meanwhile ends the wait: StopRequested).
            wait_until_reachable(gallery, settings.startup_wait_s)
            gallery.ensure_collection(space_id, dim)
        except BaseException:
            if opened:
                gallery.close()
            raise
        calibrated = thresholds.CalibratedThreshold(
            client,
            settings,
            space_id,
            model_threshold,
            load_trusted(settings.trusted_keys_file),
            defaults.margin,
            defaults.min_agreeing_frames,
        )
        return cls(settings, client, gallery, space_id, calibrated)

    def close(self) -> None:
        self.gallery.close()

    # ---- the rule in force and the index, kept up to date from the stage's tick -----------
    def maintain(self) -> None:
        """Pick up a new calibrated rule (every minute); keep the embedded gallery's index built."""
        now = time.monotonic()
        if now - self._last_rule_check > RULE_CHECK_EVERY_S:
            self._last_rule_check = now
            self.in_force = self._read_rule()
        if now - self._last_optimize > OPTIMIZE_EVERY_S:
            self._last_optimize = now
            self._optimize_in_background()

    def _read_rule(self) -> RuleInForce:
        rule = self.calibrated.current_rule()
        if rule != self._space_rule:
            log.info(
                "threshold",
                extra={
                    "space_id": self.space_id,
                    "threshold": rule.threshold,
                    "source": rule.threshold_source,
                    "margin": rule.margin,
                    "margin_source": rule.margin_source,
                    "min_agreeing_frames": rule.min_agreeing_frames,
                    "min_agreeing_frames_source": rule.min_agreeing_frames_source,
                },
            )
        self._space_rule = rule
        return RuleInForce(
            self.space_id,
            rule.threshold,
            rule.threshold_source,
            self.settings.policy.for_space(rule.margin, rule.min_agreeing_frames),
        )

    def _optimize_in_background(self) -> None:
        """qdrant-edge builds its HNSW index only when asked; the build blocks writes for a
        while (≈1 min at 100k), so it runs beside the loop, never on a payment's path."""
        optimize = getattr(self.gallery, "optimize", None)
        if optimize is None or (self._optimizer and self._optimizer.is_alive()):
            return
        self._optimizer = threading.Thread(target=optimize, args=(self.space_id,), daemon=True)
        self._optimizer.start()

    # ---- search ----------------------------------------------------------------------------
    def search(self, vector: np.ndarray, tenant: str, phone_suffix: str) -> list[Hit]:
        """The two best users of the tenant (and phone suffix, when the point of sale gave one):
        the best names the frame's vote, the second its margin."""
        return self.gallery.search(
            self.space_id, vector, limit=2, tenant=tenant or None, phone_suffix=phone_suffix or None
        )

    def duplicate_of(self, user_id: str, tenant_id: str, template: np.ndarray) -> Hit | None:
        """Another user of the tenant whom this template already matches above the threshold."""
        hits = self.gallery.search(self.space_id, template, limit=2, tenant=tenant_id or None)
        return next((h for h in hits if h.user_id != user_id and h.score >= self.in_force.threshold), None)

    # ---- writes ----------------------------------------------------------------------------
    def enroll(
        self, user_id: str, tenant_id: str, phone_suffix: str, samples: np.ndarray, chips: list[dict[str, bytes]]
    ) -> None:
        """The user's templates in this space, and the chips they came from (for re-indexing)."""
        store_templates(self.gallery, self.space_id, user_id, tenant_id, phone_suffix, samples)
        self.face_sources.save(user_id, tenant_id, phone_suffix, chips)

    def store_templates(self, space: str, user_id: str, tenant: str, phone_suffix: str, samples: np.ndarray) -> int:
        """A re-index job's result: the user's templates under another model's space."""
        stored = store_templates(self.gallery, space, user_id, tenant, phone_suffix, samples)
        self.remember_space(space)
        return stored

    def delete_user(self, user_id: str) -> int:
        """Every template (mean and samples) of the user in every space, and their chips."""
        removed = self.gallery.delete_user(self.space_id, user_id)
        for space in self.other_spaces():
            removed += self.gallery.delete_user(space, user_id)
        self.face_sources.delete(user_id)
        return removed

    def remember_space(self, space: str) -> None:
        """Every template space that holds users, so that a deletion reaches all of them."""
        self.redis.sadd(self.settings.key("spaces"), space)

    def other_spaces(self) -> list[str]:
        return sorted(
            s.decode() for s in self.redis.smembers(self.settings.key("spaces")) if s.decode() != self.space_id
        )

    # ---- reads for the operator ------------------------------------------------------------
    def list_users(self, tenant: str = "", space: str = "") -> list[str]:
        return self.gallery.list_users(space or self.space_id, tenant=tenant or None)

    def describe_user(self, user_id: str) -> list[dict]:
        return self.gallery.describe_user(self.space_id, user_id)
