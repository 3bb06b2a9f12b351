"""Component keys: one Ed25519 private key per component, and the public keys of all of them.

Every process signs what it writes with its own private key (`FACEPAY_KEY_FILE`) and verifies
what it reads against the trusted public keys (`FACEPAY_TRUSTED_KEYS_FILE`, YAML
`{component: public key hex}`). The operator's key (`FACEPAY_OPERATOR_KEY_FILE`) signs admin
commands and calibrated thresholds; the CLI and rq workers hold it, no stage does. Key material
lives in files, never in Redis: whoever can only write to Redis cannot sign.

`facepay keys generate --out DIR` writes `<component>.key` (mode 0600) for every component and
`trusted.yaml`; give each process only its own `.key` file and everyone `trusted.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from facepay.private_files import write_private

if TYPE_CHECKING:
    from facepay.config import Settings

COMPONENTS = ("gateway", "detector", "aligner", "pose", "recognizer", "archiver", "operator")
TRUSTED_FILE = "trusted.yaml"
HOW_TO = "create a keyset with `facepay keys generate --out DIR`"


class KeyFileError(RuntimeError):
    """A key file is missing, unreadable or does not match the trusted keys."""


@dataclass(frozen=True)
class Signer:
    component: str
    private_key: Ed25519PrivateKey

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


@dataclass(frozen=True)
class TrustedKeys:
    public_keys: dict[str, Ed25519PublicKey]

    def verify(self, component: str, data: bytes, signature: bytes) -> bool:
        key = self.public_keys.get(component)
        if key is None:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Keyring:
    """What one process holds: its own signer and everyone's public keys."""

    signer: Signer
    trusted: TrustedKeys


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def generate(out: Path | str, components: tuple[str, ...] = COMPONENTS) -> Path:
    """`<component>.key` (0600) per component and `trusted.yaml`; returns the trusted file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trusted = {}
    for component in components:
        key = Ed25519PrivateKey.generate()
        _write_private(out / f"{component}.key", component, key)
        trusted[component] = public_hex(key)
    trusted_file = out / TRUSTED_FILE
    trusted_file.write_text(yaml.safe_dump(trusted, sort_keys=True))
    return trusted_file


def _write_private(path: Path, component: str, key: Ed25519PrivateKey) -> None:
    write_private(path, yaml.safe_dump({"component": component, "private_key": key.private_bytes_raw().hex()}))


def load_signer(path: str, setting: str = "FACEPAY_KEY_FILE") -> Signer:
    if not path:
        raise KeyFileError(f"{setting} is not set: this process needs its private key file to sign; {HOW_TO}")
    try:
        record = yaml.safe_load(Path(path).read_text())
        return Signer(
            str(record["component"]), Ed25519PrivateKey.from_private_bytes(bytes.fromhex(record["private_key"]))
        )
    except FileNotFoundError:
        raise KeyFileError(f"{setting}={path}: no such file; {HOW_TO}") from None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise KeyFileError(f"{setting}={path}: not a facepay key file ({exc}); {HOW_TO}") from None


def load_trusted(path: str) -> TrustedKeys:
    if not path:
        raise KeyFileError(f"FACEPAY_TRUSTED_KEYS_FILE is not set: the public keys to verify with; {HOW_TO}")
    try:
        record = yaml.safe_load(Path(path).read_text()) or {}
        return TrustedKeys({str(c): Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for c, h in record.items()})
    except FileNotFoundError:
        raise KeyFileError(f"FACEPAY_TRUSTED_KEYS_FILE={path}: no such file; {HOW_TO}") from None
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError) as exc:
        raise KeyFileError(f"FACEPAY_TRUSTED_KEYS_FILE={path}: not a trusted-keys file ({exc}); {HOW_TO}") from None


def load_keyring(key_file: str, trusted_file: str, component: str, setting: str = "FACEPAY_KEY_FILE") -> Keyring:
    """This process's signer, checked to be `component`'s key and trusted as such."""
    signer, trusted = load_signer(key_file, setting), load_trusted(trusted_file)
    if signer.component != component:
        raise KeyFileError(f"{setting}={key_file} is the key of {signer.component!r}, this process is {component!r}")
    expected = trusted.public_keys.get(component)
    mine = signer.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if expected is None or expected.public_bytes(Encoding.Raw, PublicFormat.Raw) != mine:
        raise KeyFileError(f"{setting}={key_file}: its public key is not {component!r}'s in {trusted_file}")
    return Keyring(signer, trusted)


def operator_keyring(settings: Settings) -> Keyring:
    """The CLI's and rq workers' keys: the operator's signer and the trusted keys."""
    return load_keyring(settings.operator_key_file, settings.trusted_keys_file, "operator", "FACEPAY_OPERATOR_KEY_FILE")
