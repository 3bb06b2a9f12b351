"""Calibrated thresholds, one per model id, kept in Redis so every recognizer replica uses it.

`facepay calibrate` stores one, signed with the operator's key (`FACEPAY_OPERATOR_KEY_FILE`):
whoever can only write to Redis cannot lower the bar. The recognizer reads it at start and once
a minute, ignores (and logs) a record that is unsigned or does not verify, and never goes back
to a record older than the one it uses (a replayed, genuinely signed old threshold). An explicit
`FACEPAY_POLICY_THRESHOLD` overrides it; without either, the model's documented default holds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

from facepay.config import Settings
from facepay.keys import Signer, TrustedKeys
from facepay.signing import canonical_json

log = logging.getLogger(__name__)

SIGNER = "operator"


def _key(settings: Settings) -> str:
    return settings.key("thresholds")


def _signed_bytes(settings: Settings, model_id: str, record: dict) -> bytes:
    # Bound to the namespace and the template space: a record cannot be moved to another.
    return b"facepay.threshold.v1\x00" + canonical_json(
        {"namespace": settings.namespace, "model_id": model_id, "record": record}
    )


def store(client: redis.Redis, settings: Settings, model_id: str, threshold: float, signer: Signer, **evidence) -> None:
    record = json.loads(
        json.dumps({"threshold": float(threshold), "stored_at_ms": int(time.time() * 1000), **evidence}, default=float)
    )
    signature = signer.sign(_signed_bytes(settings, model_id, record)).hex()
    client.hset(
        _key(settings), model_id, json.dumps({"record": record, "signer": signer.component, "signature": signature})
    )


def load(client: redis.Redis, settings: Settings, model_id: str, trusted: TrustedKeys) -> dict | None:
    """The stored record if the operator signed it; None (logged) for anything else."""
    raw = client.hget(_key(settings), model_id)
    if not raw:
        return None
    try:
        stored = json.loads(raw)
        record, signature = stored["record"], bytes.fromhex(stored["signature"])
        valid = stored["signer"] == SIGNER and trusted.verify(
            SIGNER, _signed_bytes(settings, model_id, record), signature
        )
        float(record["threshold"]), int(record["stored_at_ms"])
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        log.warning("stored threshold ignored: not signed by the operator's key", extra={"model_id": model_id})
        return None
    return record


@dataclass(frozen=True)
class SpaceRule:
    """The session rule's numbers for one template space, and where each came from."""

    threshold: float
    margin: float
    min_agreeing_frames: int
    threshold_source: str  # "setting", "calibrated" or "model default"
    margin_source: str
    min_agreeing_frames_source: str


def _pick(setting, calibrated, model_default) -> tuple:
    if setting is not None:
        return setting, "setting"
    if calibrated is not None:
        return calibrated, "calibrated"
    return model_default, "model default"


class CalibratedThreshold:
    """What a recognizer uses: the setting, else the newest verified record it has seen (never
    an older one), else the model default."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        model_id: str,
        model_default: float,
        trusted: TrustedKeys,
        default_margin: float = 0.02,
        default_min_agreeing_frames: int = 3,
    ) -> None:
        self.redis, self.settings, self.model_id = client, settings, model_id
        self.model_default, self.trusted = model_default, trusted
        self.default_margin, self.default_min_agreeing_frames = default_margin, default_min_agreeing_frames
        self.latest: dict | None = None

    def current_rule(self) -> SpaceRule:
        """Threshold, margin and k of this template space, each: setting > calibration > model default.
        A session calibration (`facepay calibrate --sessions`) stores all three in one signed record."""
        threshold, source = self.current()
        policy, record = self.settings.policy, self.latest or {}
        margin, margin_source = _pick(policy.margin, record.get("margin"), self.default_margin)
        k, k_source = _pick(
            policy.min_agreeing_frames, record.get("min_agreeing_frames"), self.default_min_agreeing_frames
        )
        return SpaceRule(float(threshold), float(margin), int(k), source, margin_source, k_source)

    def current(self) -> tuple[float, str]:
        """(threshold, where it came from)."""
        if self.settings.policy.threshold is not None:
            return self.settings.policy.threshold, "setting"
        record = load(self.redis, self.settings, self.model_id, self.trusted)
        if record and self.latest and record["stored_at_ms"] < self.latest["stored_at_ms"]:
            log.warning("stored threshold ignored: older than the one in use", extra={"model_id": self.model_id})
        elif record:
            self.latest = record
        if self.latest:
            return float(self.latest["threshold"]), "calibrated"
        return self.model_default, "model default"


def effective(
    client: redis.Redis, settings: Settings, model_id: str, model_default: float, trusted: TrustedKeys
) -> tuple[float, str]:
    """(threshold, where it came from) for a one-off reader: the setting, the calibration, or the model default."""
    return CalibratedThreshold(client, settings, model_id, model_default, trusted).current()
