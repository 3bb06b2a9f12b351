"""The archive's keys, which never enter the archive: per-tenant key-encryption keys and the
archive signing key (HMAC of chain entries, heads, retention checkpoints and erasure notes).

A keys file (YAML or JSON, `FACEPAY_ARCHIVE_KEYS_FILE`; refused when anyone but its user, or that
user's own group as a Kubernetes Secret volume mounts it, can read it):

    signing_key: <64 hex>            # or FACEPAY_ARCHIVE_SIGNING_KEY
    tenants:
      acme: {current: k2, keys: {k2: <64 hex>, k1: <64 hex>}}   # old ids stay to read old sessions

Envelope encryption: each session gets a random 256-bit data key; every frame is sealed with
AES-256-GCM under it (associated data: session id and frame index, so a ciphertext moved to
another frame or session fails to open); the data key is sealed under the tenant's current KEK
(associated data: tenant and session) and stored, wrapped, beside the frames.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class ArchiveKeyError(ValueError):
    """A key is missing, malformed or does not open the data it should."""


def _key_from_hex(text: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ArchiveKeyError(f"{what} is not hex") from exc
    if len(key) != 32:
        raise ArchiveKeyError(f"{what} must be 32 bytes (64 hex characters), got {len(key)}")
    return key


def _check_private(path: Path) -> None:
    """Readable by this process's user, and at most its own group: a Kubernetes Secret volume
    with the pod's fsGroup is root:<fsGroup> 0440, the group being this process's alone."""
    info = path.stat()
    mode = info.st_mode
    own_group = info.st_gid == os.getgid() or info.st_gid in os.getgroups()
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and not own_group):
        raise ArchiveKeyError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    if mode & (stat.S_IWGRP | stat.S_IXGRP):
        raise ArchiveKeyError(f"{path} is group-writable (mode {oct(mode & 0o777)}); chmod 600 it")


@dataclass(frozen=True)
class TenantKeys:
    current: str
    keys: dict[str, bytes]


@dataclass(frozen=True)
class ArchiveKeys:
    signing_key: bytes
    tenants: dict[str, TenantKeys] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: dict) -> ArchiveKeys:
        tenants = {}
        for tenant, spec in (data.get("tenants") or {}).items():
            keys = {kid: _key_from_hex(str(hex_), f"KEK {tenant}/{kid}") for kid, hex_ in spec["keys"].items()}
            if spec["current"] not in keys:
                raise ArchiveKeyError(f"tenant {tenant}: current KEK {spec['current']!r} is not among its keys")
            tenants[tenant] = TenantKeys(spec["current"], keys)
        if not data.get("signing_key"):
            raise ArchiveKeyError(
                "no archive signing key (signing_key in the keys file, or FACEPAY_ARCHIVE_SIGNING_KEY)"
            )
        return cls(_key_from_hex(str(data["signing_key"]), "archive signing key"), tenants)

    @classmethod
    def from_file(cls, path: Path, signing_key_hex: str | None = None) -> ArchiveKeys:
        _check_private(path)
        data = yaml.safe_load(path.read_text()) or {}
        if signing_key_hex:
            data["signing_key"] = signing_key_hex
        return cls.from_mapping(data)

    @classmethod
    def generate(cls, tenants: list[str]) -> ArchiveKeys:
        """Fresh random keys (embedded/demo set-up and tests)."""
        return cls(secrets.token_bytes(32), {t: TenantKeys("k1", {"k1": secrets.token_bytes(32)}) for t in tenants})

    def write(self, path: Path) -> None:
        data = {
            "signing_key": self.signing_key.hex(),
            "tenants": {
                t: {"current": k.current, "keys": {kid: v.hex() for kid, v in k.keys.items()}}
                for t, k in self.tenants.items()
            },
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(data, fh)

    # --- signing -------------------------------------------------------------------------
    def sign(self, payload: bytes) -> str:
        return hmac.new(self.signing_key, payload, hashlib.sha256).hexdigest()

    def signature_ok(self, payload: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(payload), signature)

    # --- envelope encryption ---------------------------------------------------------------
    def _tenant(self, tenant: str) -> TenantKeys:
        if tenant not in self.tenants:
            raise ArchiveKeyError(f"no key-encryption key for tenant {tenant!r} in the archive keys")
        return self.tenants[tenant]

    def wrap_data_key(self, tenant: str, session_id: str, data_key: bytes) -> tuple[str, bytes]:
        keys = self._tenant(tenant)
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = f"facepay-archive/dek/{tenant}/{session_id}".encode()
        return keys.current, nonce + AESGCM(keys.keys[keys.current]).encrypt(nonce, data_key, aad)

    def unwrap_data_key(self, tenant: str, session_id: str, kek_id: str, wrapped: bytes) -> bytes:
        keys = self._tenant(tenant)
        if kek_id not in keys.keys:
            raise ArchiveKeyError(f"tenant {tenant!r} has no KEK {kek_id!r} (rotated out?)")
        aad = f"facepay-archive/dek/{tenant}/{session_id}".encode()
        try:
            return AESGCM(keys.keys[kek_id]).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise ArchiveKeyError(f"KEK {tenant}/{kek_id} does not open the data key of session {session_id}") from exc


def seal(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def open_sealed(data_key: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise ArchiveKeyError("a frame does not decrypt under its session's data key (altered or moved)") from exc
