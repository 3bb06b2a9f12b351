"""One typed settings object for the CLI, the gateway and every worker.

Values come from defaults, then an optional YAML file (`FACEPAY_CONFIG`), then environment
variables `FACEPAY_<FIELD>` (upper case; `REDIS_URL` is also read as the usual name).
`facepay config show` prints the effective values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class SessionPolicy:
    """How one payment session becomes a decision; defaults suit a payment terminal."""

    threshold: float | None = None  # cosine; None → the recognizer model's calibrated default
    margin: float = 0.02  # best user must beat the second-best user by this much (cosine)
    min_agreeing_frames: int = 3  # k of the session's eligible frames must name the same user
    max_disagreeing_ratio: float = 0.34  # above this share of votes for others → ambiguous
    require_blink: bool = True
    blink_closed_ratio: float = 0.75  # eye closed when EAR ≤ ratio × the session's open-eye EAR
    blink_open_ratio: float = 0.9  # and open again when it recovers to ≥ ratio × open-eye EAR
    # Passive anti-spoof (median score of the voting frames ≥ this). Off by default: the model
    # was trained on real vs. edited photos, not presentation attacks; blink stays the rule.
    min_passive_liveness: float | None = None
    session_timeout_s: float = 15.0  # a session with no end marker is declined after this
    decide_early: bool = True  # approve as soon as the rules hold, before the last frame


@dataclass(frozen=True)
class FailureLimits:
    """NIST SP 800-63B §5.2.3: at most 5 consecutive failed biometric attempts, then a delay of
    at least 30 s doubling with each further failure; §5.2.2: at most 100 consecutive failures
    on one account, then the biometric is disabled until an operator resets it."""

    max_consecutive: int = 5
    first_delay_s: float = 30.0
    hard_limit: int = 100


@dataclass(frozen=True)
class PoseLimits:
    """Head-pose gate, degrees. ±25° yaw/±20° pitch: what face-pay terminals accept as frontal."""

    max_abs_yaw: float = 25.0
    max_abs_pitch: float = 20.0
    max_abs_roll: float = 25.0


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "fp"
    gallery_url: str = "edge://./var/gallery"
    cameras_file: str = ""  # YAML: stores, cameras and their tokens (see README)
    # scrfd-500m: fastest with no more misses than MTCNN (README "Measured"), but InsightFace's weights
    # are for non-commercial research only; mtcnn (MIT) or blazeface/blazeface-back (Apache-2.0) otherwise.
    detector_model: str = "scrfd-500m"
    recognizer_model: str = "dlib-resnet-v1"  # or faceres-hse-v1, onnx:/path.onnx, torchscript:/path.pt
    landmarks_model: str = "facemesh"  # facemesh (torch, Apache-2.0) | dlib68 (CPU, non-commercial data)
    attributes_model: str = "faceres"  # age and gender: faceres | gear | off
    passive_liveness: bool = True  # antispoof/liveness scores per face (weak hints; see the policy)
    device: str = "auto"  # auto | cpu | cuda | cuda:N — CUDA asked for and absent is an error
    batch_size: int = 16
    batch_wait_ms: int = 40
    claim_idle_ms: int = 15_000  # a pending message idle this long is taken over (dead consumer)
    max_deliveries: int = 3  # then it goes to the dead-letter stream with its error
    stream_retention_s: int = 7 * 24 * 3600  # history kept for audit replay (XADD MINID)
    stream_maxlen: int = 1_000_000  # hard cap per stream, approximate trimming
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    min_face_px: int = 40
    # Enrollment quality gates, from real photos: identity photos' faces are ≥ 109 px and their
    # chips' sharpness ≥ 54 (LFW's ≥ 11; the same photos blurred with σ = 3 px: median 25);
    # the passive anti-spoof score of 264 real faces was ≥ 0.39.
    enroll_min_face_px: int = 80
    enroll_min_sharpness: float = 12.0
    enroll_min_antispoof: float = 0.3
    signing_key: str = ""  # HMAC-SHA256 key for decision events (hex or text)
    signing_key_id: str = "k1"
    operator_token: str = ""  # for Enroll
    # Message authentication (facepay/keys.py; `facepay keys generate`): this process's Ed25519
    # private key file, the YAML of every component's public key, and the operator's private key
    # file (CLI and rq workers only: it signs admin commands and calibrated thresholds).
    key_file: str = ""
    trusted_keys_file: str = ""
    operator_key_file: str = ""
    # Replays: the recognizer refuses frames the gateway received longer ago than this (and
    # remembers decided sessions at least as long), and admin commands issued longer ago.
    max_frame_age_s: int = 3600
    admin_max_age_s: int = 300
    metrics_port: int = 0  # Prometheus /metrics; 0 = off
    grpc_address: str = "127.0.0.1:50051"
    gateway_threads: int = 128  # concurrent gateway calls (camera streams, subscriptions, enrollments)
    worker_threads: int = 1  # torch intra-op threads per worker process
    log_format: str = "json"  # json | text
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    pose: PoseLimits = field(default_factory=PoseLimits)
    limits: FailureLimits = field(default_factory=FailureLimits)

    def key(self, *parts: str) -> str:
        """A Redis key or stream name inside this deployment's namespace."""
        return ":".join((self.namespace, *parts))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if redact:
            for secret in ("signing_key", "operator_token"):
                values[secret] = "***" if values[secret] else ""
        return values


NESTED = (("policy", SessionPolicy, "FACEPAY_POLICY_"), ("pose", PoseLimits, "FACEPAY_POSE_"),
          ("limits", FailureLimits, "FACEPAY_LIMITS_"))


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    config_file = env.get("FACEPAY_CONFIG")
    if config_file:
        values.update(yaml.safe_load(Path(config_file).read_text()) or {})
    if "REDIS_URL" in env:
        values["redis_url"] = env["REDIS_URL"]
    for f in fields(Settings):
        name = f"FACEPAY_{f.name.upper()}"
        if name in env:
            values[f.name] = env[name]
    for nested_name, nested_cls, prefix in NESTED:
        nested = dict(values.get(nested_name) or {})
        for f in fields(nested_cls):
            if prefix + f.name.upper() in env:
                nested[f.name] = env[prefix + f.name.upper()]
        values[nested_name] = nested_cls(**{f.name: _coerce(f, nested[f.name]) for f in fields(nested_cls) if f.name in nested})
    unknown = set(values) - {f.name for f in fields(Settings)}
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{f.name: _coerce(f, values[f.name]) for f in fields(Settings) if f.name in values})


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    if "bool" in kind:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return None if value.lower() in ("", "none") else float(value)
    return value
