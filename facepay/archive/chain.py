"""The per-store hash chain: one signed entry per archived session.

An entry names its position (`seq`), the previous entry's hash, the session, its object key,
its decision time and its content hash. Its hash is sha256 of its canonical JSON; its
signature is an HMAC of the same bytes under the archive signing key (not stored in the
archive), so someone who can write to the bucket but lacks the key cannot re-forge a chain
after removing, altering or reordering a session.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from facepay.archive.keys import ArchiveKeys

GENESIS = "0" * 64


class ChainSignatureError(ValueError):
    pass


def canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def signed_document(data: dict, keys: ArchiveKeys) -> bytes:
    return canonical({"body": data, "sig": keys.sign(canonical(data))})


def open_signed_document(raw: bytes, keys: ArchiveKeys) -> dict:
    doc = json.loads(raw)
    if not keys.signature_ok(canonical(doc["body"]), doc["sig"]):
        raise ChainSignatureError("signature does not match (altered, or signed by another key)")
    return doc["body"]


@dataclass(frozen=True)
class ChainEntry:
    seq: int
    prev: str  # hash of entry seq-1 (GENESIS for the first)
    session_id: str
    key: str  # the session object's key
    decided_ms: int
    content_sha256: str
    user: str | None  # keyed digest of the approved user (lets the sweep clear the user index), never the id
    # When it was chained: max(archiver clock, previous entry's chained_ms), so non-decreasing
    # along the chain whatever the replicas' clocks — what lets verify find a time range by
    # binary search. Decision times are not in chain order (a session can be archived hours
    # late, after an outage or a redelivery).
    chained_ms: int

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical(asdict(self))).hexdigest()

    def to_bytes(self, keys: ArchiveKeys) -> bytes:
        return signed_document(asdict(self), keys)

    @classmethod
    def from_bytes(cls, raw: bytes, keys: ArchiveKeys) -> ChainEntry:
        return cls(**open_signed_document(raw, keys))
