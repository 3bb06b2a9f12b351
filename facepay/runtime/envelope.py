"""Signed stream entries and the gateway's attestation of a frame's origin.

An entry is `{m: body, s: signature, k: signer}`: `s` is the signer's Ed25519 signature over
the stream's name and the exact body bytes (so an entry cannot be moved to another stream or
namespace), verified against the trusted public keys before the body is decoded.

Stages re-sign what they emit, so an entry only proves which stage wrote it. The frame's origin
is proven once, by the gateway, inside the `FrameRef` that every downstream message carries:
the image's sha256 and the gateway's signature over the ref's other fields (all str/int, packed
in declaration order, so the bytes are canonical). Changing the session, store, camera, user,
purpose or sequence of a frame breaks that signature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import msgpack

from facepay.keys import Signer, TrustedKeys
from facepay.messages import FIELD, FrameRef

SIGNATURE, SIGNER = b"s", b"k"
ENTRY_CONTEXT = b"facepay.entry.v1\x00"
ORIGIN_CONTEXT = b"facepay.frame-origin.v1\x00"
ORIGIN_SIGNER = "gateway"


class Unauthenticated(Exception):
    """An entry or a frame origin that does not verify: dead-lettered, never processed."""


def _entry_bytes(stream: str, body: bytes) -> bytes:
    return ENTRY_CONTEXT + stream.encode() + b"\x00" + body


def seal(fields: dict[bytes, bytes], stream: str, signer: Signer) -> dict[bytes, bytes]:
    """The entry's fields with the signature over its body (`m`) and the signer's name."""
    signature = signer.sign(_entry_bytes(stream, fields[FIELD]))
    return {**fields, SIGNATURE: signature, SIGNER: signer.component.encode()}


def open_entry(
    fields: dict[bytes, bytes], stream: str, trusted: TrustedKeys, signers: set[str] | frozenset[str]
) -> tuple[str, bytes]:
    """(signer, body) of an entry signed by one of `signers`; Unauthenticated otherwise."""
    body, signature = fields.get(FIELD), fields.get(SIGNATURE)
    signer = fields.get(SIGNER, b"").decode(errors="replace")
    if body is None or not signature:
        raise Unauthenticated("entry is not signed")
    if signer not in signers:
        raise Unauthenticated(f"signer {signer!r} may not write {stream} (expected {', '.join(sorted(signers))})")
    if not trusted.verify(signer, _entry_bytes(stream, body), signature):
        raise Unauthenticated(f"signature of {signer!r} does not verify")
    return signer, body


# ---- the frame's origin ----------------------------------------------------------------------
def _ref_bytes(ref: FrameRef) -> bytes:
    values = [getattr(ref, f.name) for f in dataclasses.fields(ref) if f.name != "origin_sig"]
    return ORIGIN_CONTEXT + msgpack.packb(values)


def image_digest(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def attest(ref: FrameRef, signer: Signer, image: bytes | None = None) -> FrameRef:
    """The gateway's ref: with the image digest (frames) and the signature over it all."""
    if image is not None:
        ref = dataclasses.replace(ref, image_sha256=image_digest(image))
    return dataclasses.replace(ref, origin_sig=signer.sign(_ref_bytes(ref)).hex())


def origin_problem(ref: FrameRef, trusted: TrustedKeys, max_age_s: float | None = None) -> str:
    """Why this ref's origin cannot be believed ('' when the gateway attested it, recently)."""
    try:
        signature = bytes.fromhex(ref.origin_sig)
    except ValueError:
        return "frame origin signature is not hex"
    if not signature or not trusted.verify(ORIGIN_SIGNER, _ref_bytes(ref), signature):
        return "frame origin is not attested by the gateway"
    if max_age_s is not None and time.time() * 1000 - ref.received_ms > max_age_s * 1000:
        return f"frame received by the gateway more than {max_age_s:.0f} s ago (replay?)"
    return ""
