"""The `.fpa` object: one archived session, sealed.

    b"FPA1" + msgpack {
      "header": bytes,            # msgpack of ArchivedSession.header(), in the clear
      "key": {"kek_id", "wrapped"} | None,   # the session's data key under the tenant KEK
      "key_sha256": hex,
      "frames": [{"index", "sha256", "sealed": bytes | None}],  # AES-GCM(msgpack(ArchivedFrame))
      "erasure": {"note": bytes, "sig": hex} | None,
    }

The content hash is over a digest of the parts (header bytes, key, each frame's ciphertext
hash), not over the object bytes: an erasure removes ciphertexts and the wrapped key but keeps
their hashes, so the session's content hash — which the store's hash chain names — does not
change, and an altered byte anywhere else still shows. Parts are hashed as stored bytes;
nothing is re-serialised before hashing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack

from facepay.archive.keys import ArchiveKeys, open_sealed, seal
from facepay.archive.record import RECORD_SCHEMA_VERSION, ArchivedFrame, ArchivedSession

MAGIC = b"FPA1"


class RecordError(ValueError):
    """The bytes are not a readable archived session."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _frame_aad(session_id: str, index: int) -> bytes:
    return f"facepay-archive/frame/{session_id}/{index}".encode()


@dataclass
class FrameSlot:
    index: int
    sha256: str
    sealed: bytes | None  # None once erased


@dataclass
class SealedSession:
    header_bytes: bytes
    key: dict[str, Any] | None
    key_sha256: str
    frames: list[FrameSlot]
    erasure: dict[str, Any] | None = None
    header: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.header = msgpack.unpackb(self.header_bytes)

    @property
    def session_id(self) -> str:
        return self.header["session_id"]

    def content_sha256(self) -> str:
        """Digest of the parts as recorded (see module doc)."""
        digest = msgpack.packb(
            [
                "facepay-archive/content",
                _sha256(self.header_bytes),
                self.key_sha256,
                [[f.index, f.sha256] for f in self.frames],
            ]
        )
        return _sha256(digest)

    def integrity_problems(self, keys: ArchiveKeys) -> list[str]:
        """Parts whose bytes no longer match their recorded hashes, or removed without a signed erasure."""
        problems = []
        for slot in self.frames:
            if slot.sealed is not None and _sha256(slot.sealed) != slot.sha256:
                problems.append(f"frame {slot.index} ciphertext does not match its hash")
        if self.key is not None and _key_digest(self.key) != self.key_sha256:
            problems.append("wrapped data key does not match its hash")
        removed = self.key is None or any(s.sealed is None for s in self.frames)
        if removed and not self.erasure_ok(keys):
            problems.append("frames or key removed without a valid signed erasure note")
        return problems

    def erasure_ok(self, keys: ArchiveKeys) -> bool:
        if not self.erasure:
            return False
        note = json.loads(self.erasure["note"])
        return (
            keys.signature_ok(self.erasure["note"], self.erasure["sig"]) and note.get("session_id") == self.session_id
        )

    @property
    def erased(self) -> bool:
        return self.erasure is not None

    def to_bytes(self) -> bytes:
        return MAGIC + msgpack.packb(
            {
                "header": self.header_bytes,
                "key": self.key,
                "key_sha256": self.key_sha256,
                "frames": [{"index": f.index, "sha256": f.sha256, "sealed": f.sealed} for f in self.frames],
                "erasure": self.erasure,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedSession:
        if not data.startswith(MAGIC):
            raise RecordError("not a facepay archive record (bad magic)")
        try:
            body = msgpack.unpackb(data[len(MAGIC) :])
            frames = [FrameSlot(f["index"], f["sha256"], f["sealed"]) for f in body["frames"]]
            sealed = cls(body["header"], body["key"], body["key_sha256"], frames, body.get("erasure"))
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise RecordError(f"unreadable archive record: {exc}") from exc
        if sealed.header.get("schema_version") != RECORD_SCHEMA_VERSION:
            raise RecordError(
                f"archive record schema {sealed.header.get('schema_version')} is not {RECORD_SCHEMA_VERSION}"
            )
        return sealed

    def erase(self, keys: ArchiveKeys, reason: str, erased_ms: int) -> None:
        """Drop every frame's ciphertext and the wrapped data key; sign a note saying so."""
        for slot in self.frames:
            slot.sealed = None
        self.key = None
        note = json.dumps(
            {"session_id": self.session_id, "reason": reason, "erased_ms": erased_ms}, sort_keys=True
        ).encode()
        self.erasure = {"note": note, "sig": keys.sign(note)}


def _key_digest(key: dict[str, Any]) -> str:
    return _sha256(key["kek_id"].encode() + b"\0" + key["wrapped"])


def seal_session(session: ArchivedSession, keys: ArchiveKeys) -> SealedSession:
    data_key = secrets.token_bytes(32)
    kek_id, wrapped = keys.wrap_data_key(session.tenant, session.session_id, data_key)
    key = {"kek_id": kek_id, "wrapped": wrapped}
    slots = []
    for frame in session.frames:
        sealed = seal(data_key, msgpack.packb(frame.to_wire()), _frame_aad(session.session_id, frame.index))
        slots.append(FrameSlot(frame.index, _sha256(sealed), sealed))
    return SealedSession(msgpack.packb(session.header()), key, _key_digest(key), slots)


def open_session(sealed: SealedSession, keys: ArchiveKeys) -> ArchivedSession:
    """Decrypt; an erased session comes back with no frames."""
    header = sealed.header
    if sealed.key is None:
        return ArchivedSession.from_header(header, [])
    data_key = keys.unwrap_data_key(header["tenant"], header["session_id"], sealed.key["kek_id"], sealed.key["wrapped"])
    frames = [
        ArchivedFrame.from_wire(
            msgpack.unpackb(open_sealed(data_key, slot.sealed, _frame_aad(header["session_id"], slot.index)))
        )
        for slot in sealed.frames
        if slot.sealed is not None
    ]
    return ArchivedSession.from_header(header, frames)
