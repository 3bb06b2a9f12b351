"""Calibrated thresholds, one per model id, kept in Redis so every recognizer replica uses it.

`facepay calibrate` stores one; the recognizer reads it at start and once a minute. An explicit
`FACEPAY_POLICY_THRESHOLD` overrides it; without either, the model's documented default holds.
"""

from __future__ import annotations

import json
import time

import redis

from facepay.config import Settings


def _key(settings: Settings) -> str:
    return settings.key("thresholds")


def store(client: redis.Redis, settings: Settings, model_id: str, threshold: float, **evidence) -> None:
    record = {"threshold": float(threshold), "stored_at_ms": int(time.time() * 1000), **evidence}
    client.hset(_key(settings), model_id, json.dumps(record, default=float))


def load(client: redis.Redis, settings: Settings, model_id: str) -> dict | None:
    raw = client.hget(_key(settings), model_id)
    return json.loads(raw) if raw else None


def effective(client: redis.Redis, settings: Settings, model_id: str, model_default: float) -> tuple[float, str]:
    """(threshold, where it came from): the setting, the calibration, or the model default."""
    if settings.policy.threshold is not None:
        return settings.policy.threshold, "setting"
    record = load(client, settings, model_id)
    if record:
        return float(record["threshold"]), "calibrated"
    return model_default, "model default"
