"""Decision events are signed with HMAC-SHA256 under a key id; backends verify them.

The signed bytes are the canonical JSON of the event (sorted keys, no spaces), stored as is,
so a verifier never re-serialises anything. Events carry no image and no embedding.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any


class SignatureError(ValueError):
    pass


def canonical_json(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_bytes(key: str) -> bytes:
    """A key given as hex (64+ hex chars) is used as raw bytes; any other text as UTF-8."""
    try:
        return bytes.fromhex(key) if len(key) >= 64 else key.encode()
    except ValueError:
        return key.encode()


def sign(event: Mapping[str, Any], key: str, key_id: str) -> dict[bytes, bytes]:
    """The stream entry for an event: payload, signature and key id."""
    if not key:
        raise ValueError("no signing key configured (FACEPAY_SIGNING_KEY)")
    payload = canonical_json(event)
    signature = hmac.new(key_bytes(key), payload, hashlib.sha256).hexdigest()
    return {b"payload": payload, b"sig": signature.encode(), b"kid": key_id.encode()}


def verify(payload: bytes, signature: str, key_id: str, keys: Mapping[str, str]) -> dict[str, Any]:
    """The event if its signature is valid under the named key; SignatureError otherwise."""
    if key_id not in keys:
        raise SignatureError(f"unknown signing key id {key_id!r}")
    expected = hmac.new(key_bytes(keys[key_id]), payload, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("signature does not match the payload")
    return json.loads(payload)
