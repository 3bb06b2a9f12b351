"""Where the archive is and how it is reached, from `FACEPAY_ARCHIVE_*` settings.

`FACEPAY_ARCHIVE_URL`:
- `s3://bucket[/prefix]` — AWS S3; region and credentials the usual AWS way.
- `http(s)://host:port/bucket[/prefix]` — any S3-compatible server (MinIO, Ceph RGW, a
  SeaweedFS cluster, the embedded SeaweedFS), path-style addressing.

Credentials are never part of the URL: boto3's chain reads `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (or `AWS_SHARED_CREDENTIALS_FILE`, an instance role, …).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from facepay.config import Settings

DEFAULT_RETENTION_DAYS = 90


class ArchiveConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ArchiveSettings:
    bucket: str
    prefix: str = ""  # e.g. "prod/" — every key of this archive starts with it
    endpoint_url: str | None = None  # None → AWS
    region: str = "us-east-1"
    keys_file: Path | None = None
    signing_key_hex: str | None = None
    retention_days: int = DEFAULT_RETENTION_DAYS
    keep_embeddings: bool = False  # embeddings are the most sensitive output: off unless asked

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> ArchiveSettings:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ArchiveConfigError(
                "FACEPAY_ARCHIVE_URL must not carry credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        path = parts.path.strip("/")
        if parts.scheme == "s3":
            bucket, prefix, endpoint = parts.netloc, path, None
        elif parts.scheme in ("http", "https"):
            bucket, _, prefix = path.partition("/")
            endpoint = f"{parts.scheme}://{parts.netloc}"
        else:
            raise ArchiveConfigError(
                f"FACEPAY_ARCHIVE_URL {url!r}: expected s3://bucket[/prefix] or http(s)://host:port/bucket[/prefix]"
            )
        if not bucket:
            raise ArchiveConfigError(f"FACEPAY_ARCHIVE_URL {url!r} names no bucket")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "", endpoint_url=endpoint, **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ArchiveSettings:
        env = dict(os.environ if env is None else env)
        if not env.get("FACEPAY_ARCHIVE_URL"):
            raise ArchiveConfigError("FACEPAY_ARCHIVE_URL is not set")
        keys_file = env.get("FACEPAY_ARCHIVE_KEYS_FILE")
        return cls.from_url(
            env["FACEPAY_ARCHIVE_URL"],
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            keys_file=Path(keys_file) if keys_file else None,
            signing_key_hex=env.get("FACEPAY_ARCHIVE_SIGNING_KEY") or None,
            retention_days=int(env.get("FACEPAY_ARCHIVE_RETENTION_DAYS", DEFAULT_RETENTION_DAYS)),
            keep_embeddings=env.get("FACEPAY_ARCHIVE_KEEP_EMBEDDINGS", "false").lower() in ("1", "true", "yes", "on"),
        )

    @classmethod
    def from_facepay(cls, settings: Settings, env: dict[str, str] | None = None) -> ArchiveSettings:
        """From facepay's Settings (`archive_*`); the signing key may also come from
        `FACEPAY_ARCHIVE_SIGNING_KEY` (a secret, kept out of Settings and `config show`)."""
        env = dict(os.environ if env is None else env)
        return cls.from_url(
            settings.archive_url,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            keys_file=Path(settings.archive_keys_file) if settings.archive_keys_file else None,
            signing_key_hex=env.get("FACEPAY_ARCHIVE_SIGNING_KEY") or None,
            retention_days=settings.archive_retention_days,
            keep_embeddings=settings.archive_keep_embeddings,
        )
