"""Decision events are signed; a backend can tell an altered event from a genuine one."""

from __future__ import annotations

import pytest

from facepay.signing import SignatureError, sign, verify

KEYS = {"k1": "a" * 64}
EVENT = {"session_id": "pos-1", "decision": "approve", "user_id": "alice", "score": 0.97}


def test_a_genuine_event_verifies():
    entry = sign(EVENT, KEYS["k1"], "k1")
    assert verify(entry[b"payload"], entry[b"sig"].decode(), "k1", KEYS) == EVENT


def test_an_altered_payload_fails_verification():
    entry = sign(EVENT, KEYS["k1"], "k1")
    forged = entry[b"payload"].replace(b"alice", b"mallory")
    with pytest.raises(SignatureError):
        verify(forged, entry[b"sig"].decode(), "k1", KEYS)


def test_an_altered_signature_or_unknown_key_fails_verification():
    entry = sign(EVENT, KEYS["k1"], "k1")
    signature = entry[b"sig"].decode()
    with pytest.raises(SignatureError):
        verify(entry[b"payload"], ("0" if signature[0] != "0" else "1") + signature[1:], "k1", KEYS)
    with pytest.raises(SignatureError):
        verify(entry[b"payload"], signature, "k2", KEYS)
