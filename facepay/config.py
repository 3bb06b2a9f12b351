"""One typed settings object for the CLI, the gateway and every worker.

Values come from defaults, then an optional YAML file (`FACEPAY_CONFIG`), then environment
variables `FACEPAY_<FIELD>` (upper case; `REDIS_URL` is also read as the usual name), and
`FACEPAY_<SECTION>_<FIELD>` for the nested sections (`FACEPAY_POLICY_THRESHOLD`).
`facepay config show` prints the effective values.

Every Settings is validated when it is built (`validate`): unknown keys at any level of the YAML
file, unknown variables under a section's prefix, values of the wrong type and values out of
range (`BOUNDS`, `CHOICES`, `RULES`) are a `SettingsError` that names the setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import numbers
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import yaml

from facepay.redaction import redact_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionPolicy:
    """How one payment session becomes a decision; defaults suit a payment terminal."""

    threshold: float | None = None  # cosine; None → the recognizer model's calibrated default
    # Best user must beat the second-best user by this much (cosine). None → the template
    # space's calibrated margin, else the recognizer model's default (facepay/models/registry.py):
    # 0.02 cosine is a different rule for each model.
    margin: float | None = None
    # k of the session's eligible frames must name the same user. None → calibrated, else model default.
    min_agreeing_frames: int | None = None
    max_disagreeing_ratio: float = 0.34  # above this share of votes for others → ambiguous
    require_blink: bool = True
    blink_closed_ratio: float = 0.75  # eye closed when EAR ≤ ratio × the session's open-eye EAR
    blink_open_ratio: float = 0.9  # and open again when it recovers to ≥ ratio × open-eye EAR
    # Passive anti-spoof (median score of the voting frames ≥ this). Off by default: the model
    # was trained on real vs. edited photos, not presentation attacks; blink stays the rule.
    min_passive_liveness: float | None = None
    session_timeout_s: float = 15.0  # a session with no end marker is declined after this
    decide_early: bool = True  # approve as soon as the rules hold, before the last frame

    def for_space(self, margin: float, min_agreeing_frames: int) -> SessionPolicy:
        """This policy with the template space's margin and k where no setting gives them."""
        return dataclasses.replace(
            self,
            margin=margin if self.margin is None else self.margin,
            min_agreeing_frames=min_agreeing_frames if self.min_agreeing_frames is None else self.min_agreeing_frames,
        )


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
class QdrantTuning:
    """How the gallery's Qdrant collections are built and searched (both backends: the embedded
    engine and a Qdrant server). Chosen by `bench/gallery.py` at 1 M templates (README "Measured").
    Index and storage fields apply when a collection is created; search fields on every search."""

    hnsw_m: int = 16  # graph links per point: recall vs memory and build time
    hnsw_ef_construct: int = 64  # build-time candidate list: recall vs build time
    hnsw_ef: int = 256  # search-time candidate list: recall vs latency (1 M: README "Measured")
    # A filter matching fewer vectors than this (KB of vectors) is scanned exactly, not walked on
    # the graph: there is no graph per tenant (payload_m 0), and on the global graph a 2 %
    # filter found nothing at 1 M (README "Measured"). 40,000 KB ≈ 80,000 templates of 128 floats.
    full_scan_threshold_kb: int = 40_000
    # A segment gets its HNSW index once its vectors pass this (KB); below, it is scanned.
    indexing_threshold_kb: int = 10_000
    indexing_threads: int = 1  # HNSW build threads: one, so the other core keeps serving payments
    quantization: str = "int8"  # int8 (scalar, kept in RAM; originals on disk, rescored) | none
    oversampling: float = 2.0  # quantized candidates per wanted hit, rescored with the originals
    vectors_on_disk: bool = True  # original float vectors memory-mapped (page cache), not pinned
    payload_on_disk: bool = True
    # Points per write: qdrant-edge holds the GIL while it applies one (a 10k batch froze the
    # process for 2.2 s on the busy machine, 1,024 for 0.1 s); also the server's request size.
    upsert_batch: int = 256
    # Qdrant server only: the collection's layout on a cluster and how a lost node is waited for.
    shard_number: int = 1
    replication_factor: int = 1
    write_consistency_factor: int = 1  # replicas that must acknowledge a write (≤ replication_factor)
    retries: int = 3  # extra attempts of a request that met a connection error or timeout
    retry_backoff_s: float = 0.5  # first wait between attempts, doubling
    timeout_s: float = 5.0  # per request


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"  # redis://user@host:port/db, or rediss:// for TLS
    # The Redis user's password, read from a file (a mounted secret) rather than put in the URL,
    # so that it is in no environment or command line; with TLS, the CA (and a client
    # certificate and key, for servers that ask for one). Folded into redis_url at load time.
    redis_password_file: str = ""
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    namespace: str = "fp"
    # Stream partitions (README "Streams on a cluster"): a session's entries, state and decision
    # live in partition crc32(store/session) % N, all in one hash slot (`{ns}:{pNN}:…`). 1 on one
    # server keeps the plain names; on a cluster (redis+cluster://) about 2 × the primaries, so
    # that slots, hence load, can move between them (more cost more per frame: bench/cluster.py).
    stream_partitions: int = 1
    # rq's queue (enrollment and re-index jobs): rq needs a standalone Redis — it has no Redis
    # Cluster support (rq/rq#1942) — so with a cluster redis_url, name one here. Empty: redis_url.
    jobs_redis_url: str = ""
    # After a write that acknowledges work (a frame to a camera, a worker's outputs), wait until
    # this many replicas have it (WAIT): a primary lost right after loses no acknowledged frame.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    gallery_url: str = "edge://./var/gallery"
    cameras_file: str = ""  # YAML: stores, cameras and their tokens (see README)
    # mtcnn (MIT) by default, as the recognizer is dlib's (CC0): what runs by default is something a
    # shop may run. scrfd-500m is ≈ 4× faster with no more misses (README "Measured") but InsightFace's
    # weights are for non-commercial research only; blazeface/blazeface-back (Apache-2.0) miss group faces.
    detector_model: str = "mtcnn"
    recognizer_model: str = "dlib-resnet-v1"  # or faceres-hse-v1, onnx:/path.onnx, torchscript:/path.pt
    landmarks_model: str = "facemesh"  # facemesh (torch, Apache-2.0) | dlib68 (CPU, non-commercial data)
    attributes_model: str = "faceres"  # age and gender: faceres | gear | off
    passive_liveness: bool = True  # antispoof/liveness scores per face (weak hints; see the policy)
    device: str = "auto"  # auto | cpu | cuda | cuda:N — CUDA asked for and absent is an error
    batch_size: int = 16
    batch_wait_ms: int = 40
    claim_idle_ms: int = 15_000  # a pending message idle this long is taken over (dead consumer)
    max_deliveries: int = 3  # failed attempts (raised, or its worker died on it alone), then dead letter
    # How long decisions and decided sessions are remembered in Redis (a session is never decided
    # twice); the audit record is the archive (archive_url). Unread entries, and a session's
    # entries until the archiver has archived it, are never trimmed.
    stream_retention_s: int = 6 * 3600
    # Face images and chips ride every stage stream (frames, faces, aligned, posed): each worker
    # trims its input to this much history, so a payer's face is not kept longer (biometric data).
    image_retention_s: int = 3600
    stream_maxlen: int = 1_000_000  # bound per stream: past it processed entries go, unread ones never
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
    # Audit archive (facepay/archive/, services/archiver/): where decided payment sessions go.
    # "" → no archiver (the supervisor sets its embedded SeaweedFS here). Credentials: AWS_* env.
    archive_url: str = ""
    archive_keys_file: str = ""  # tenant KEKs and the archive signing key (0600)
    archive_retention_days: int = 90
    archive_keep_embeddings: bool = False
    # A decision whose frames have not all reached the archiver yet is held this long, then
    # archived with the missing frames noted.
    archive_gather_grace_s: float = 10.0
    # Entries of a session no decision came for are released (unarchived) after this long.
    archive_orphan_after_s: int = 2 * 3600
    # The retention sweep (archive_retention_days) runs this often, in one archiver replica.
    archive_sweep_every_s: int = 3600
    # Sessions of a store whose chain refuses appends (tampered or unreadable) are kept sealed
    # outside the chain (quarantined); this often the archiver tries to chain them again.
    archive_quarantine_retry_s: int = 60
    metrics_port: int = 0  # Prometheus /metrics; 0 = off
    metrics_address: str = "127.0.0.1"  # where /metrics listens; 0.0.0.0 for a scraper on the network
    # Worker probes (facepay/runtime/health.py): HTTP /livez, /readyz, /startupz; 0 = off. Loopback
    # by default (one machine); a pod's kubelet needs 0.0.0.0.
    health_port: int = 0
    health_address: str = "127.0.0.1"
    # /livez fails once the worker loop has not turned for this long (a hung stage): longer than
    # the idle read's 1 s block + batch_wait_ms + the slowest batch the stage ever processes.
    health_stale_s: float = 60.0
    # At start-up a worker waits this long for Redis (and the recognizer for a Qdrant server)
    # before exiting with an error that says so, instead of failing at the first refused connection.
    startup_wait_s: float = 120.0
    grpc_address: str = "127.0.0.1:50051"
    # gRPC TLS. The gateway refuses to listen on a non-loopback address without it, unless
    # grpc_allow_plaintext says TLS is terminated in front of it (mesh, proxy).
    grpc_tls_cert_file: str = ""  # gateway: PEM certificate chain
    grpc_tls_key_file: str = ""  # gateway: PEM private key
    grpc_tls_client_ca_file: str = ""  # gateway: CA of the cameras' client certificates (mutual TLS)
    grpc_tls_require_client_cert: bool = False  # gateway: no certificate, no call (else optional)
    grpc_tls_ca_file: str = ""  # clients: CA that signed the gateway's certificate (set → TLS)
    grpc_tls_client_cert_file: str = ""  # clients: own certificate for mutual TLS
    grpc_tls_client_key_file: str = ""
    grpc_allow_plaintext: bool = False  # serve plaintext gRPC on a non-loopback address
    gateway_threads: int = 128  # concurrent gateway calls (camera streams, subscriptions, enrollments)
    # Admission (services/gateway/guard.py): callers are authenticated from their metadata
    # before a thread is given to them; each caller has its own share of the threads.
    grpc_max_message_bytes: int = 0  # largest message received; 0 = max_image_bytes + 64 KiB
    grpc_max_calls_per_camera: int = 4  # concurrent calls of one camera
    grpc_max_calls_per_backend: int = 4  # concurrent calls with one store's backend token
    grpc_max_calls_per_peer: int = 32  # concurrent calls from one IP address (all kinds)
    grpc_health_reserved_calls: int = 8  # health checks, served outside gateway_threads
    grpc_health_address: str = ""  # also serve health (only) here, plaintext: for probes that speak no TLS
    grpc_idle_timeout_s: float = 30.0  # a call waiting this long for the client's next message is ended
    # Connections are retired (GOAWAY) after this long, so long-lived HTTP/2 connections spread
    # again over the replicas a scale-up added; calls in progress get grpc_stop_grace_s. 0 = never.
    grpc_max_connection_age_s: float = 0.0
    # On SIGTERM the gateway answers health NOT_SERVING at once, keeps serving this long (while the
    # load balancer takes it out), then stops taking calls and gives those in progress grpc_stop_grace_s.
    grpc_drain_s: float = 0.0
    grpc_stop_grace_s: float = 5.0
    camera_max_fps: float = 30.0  # per camera, token bucket
    camera_burst: int = 100  # frames a camera may send at once above its rate
    queue_max_lag: int = 5000  # refuse frames while the detector has this many undelivered; 0 = off
    queue_max_memory_ratio: float = 0.9  # refuse frames above this share of Redis maxmemory; 0 = off
    queue_max_memory_bytes: int = 0  # or above this used_memory (for a Redis without maxmemory); 0 = off
    session_max_frames: int = 600  # frames (and highest sequence) of one payment session
    session_max_duration_s: float = 120.0  # first frame to last accepted frame of one session
    worker_threads: int = 1  # torch intra-op threads per worker process
    log_format: str = "json"  # json | text
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    pose: PoseLimits = field(default_factory=PoseLimits)
    limits: FailureLimits = field(default_factory=FailureLimits)
    qdrant: QdrantTuning = field(default_factory=QdrantTuning)

    def __post_init__(self) -> None:
        validate(self)  # also on replace(): a Settings that exists is a valid one

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
            values["redis_url"] = redact_url(values["redis_url"])
        return values


class SettingsError(ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message names it."""


# ---------------------------------------------------------------- loading

# FACEPAY_* variables that are not settings: process plumbing, caches, test data.
NON_SETTING_ENV = frozenset(
    {
        "FACEPAY_CONFIG",
        "FACEPAY_CONSUMER",
        "FACEPAY_MODEL_CACHE",
        "FACEPAY_TEST_DATA",
        "FACEPAY_TFJS_ORACLE_CACHE",
        "FACEPAY_ARCHIVE_SIGNING_KEY",
    }
)


def sections() -> dict[str, type]:
    """The nested settings (`policy`, `pose`, `limits`, …): every field of Settings that is a dataclass."""
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings) if dataclasses.is_dataclass(hints[f.name])}


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Defaults ← the YAML file named by FACEPAY_CONFIG ← FACEPAY_* variables.

    Unknown keys are errors at every level of the YAML file, and so are unknown variables under
    a section's prefix (FACEPAY_POLICY_…): a setting of the payment rule that is silently ignored
    is the worst kind of bug. Other unknown FACEPAY_* variables are warned about, not fatal: the
    prefix is shared with variables that are not settings (`NON_SETTING_ENV`).
    """
    env = dict(os.environ if env is None else env)
    values = _read_config_file(env["FACEPAY_CONFIG"]) if env.get("FACEPAY_CONFIG") else {}
    _reject_unknown_keys(values)
    if "REDIS_URL" in env:
        values["redis_url"] = env["REDIS_URL"]
    _overlay_env(values, env)
    nested, hints = sections(), typing.get_type_hints(Settings)
    settings = Settings(
        **{
            name: _build_section(name, nested[name], value) if name in nested else _coerce(name, hints[name], value)
            for name, value in values.items()
        }
    )
    return settings.replace(redis_url=_effective_redis_url(settings))


def _effective_redis_url(settings: Settings) -> str:
    """redis_url with the password file's password and the TLS files, as redis-py reads them
    (so every client — workers, gateway, CLI, rq — connects the same way)."""
    parts = urlsplit(settings.redis_url)
    netloc, query = parts.netloc, parse_qsl(parts.query)
    if settings.redis_password_file:
        password = Path(settings.redis_password_file).read_text().strip()
        host = netloc.rpartition("@")[2]
        user = unquote(parts.username or "")
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    tls = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    if any(tls.values()) and not parts.scheme.startswith("rediss"):
        raise SettingsError(
            "FACEPAY_REDIS_TLS_* files are set but FACEPAY_REDIS_URL is not rediss:// (or rediss+cluster://)"
        )
    query = [(k, v) for k, v in query if k not in tls or not tls[k]] + [(k, v) for k, v in tls.items() if v]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))


def _read_config_file(path: str) -> dict[str, Any]:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return values


def _reject_unknown_keys(values: dict[str, Any]) -> None:
    known = [f.name for f in fields(Settings)]
    for key in values:
        if key not in known:
            raise SettingsError(f"unknown setting {key!r}{_did_you_mean(str(key), known)}")
    for name, cls in sections().items():
        section = values.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise SettingsError(
                f"setting {name!r} is a section: expected a mapping of "
                f"{', '.join(f.name for f in fields(cls))}, got {section!r}"
            )
        section_known = [f.name for f in fields(cls)]
        for key in section:
            if key not in section_known:
                raise SettingsError(f"unknown setting '{name}.{key}'{_did_you_mean(str(key), section_known)}")


def setting_variables() -> dict[str, tuple[str, str | None]]:
    """Every FACEPAY_* variable that is a setting: {variable: (setting, field of its section or None)}.

    The one mapping from environment to settings (deploy manifests are checked against it)."""
    variables: dict[str, tuple[str, str | None]] = {
        f"FACEPAY_{f.name.upper()}": (f.name, None) for f in fields(Settings) if f.name not in sections()
    }
    for name, cls in sections().items():
        variables.update({f"FACEPAY_{name.upper()}_{f.name.upper()}": (name, f.name) for f in fields(cls)})
    return variables


def _overlay_env(values: dict[str, Any], env: dict[str, str]) -> None:
    expected = setting_variables()
    for variable, value in env.items():
        if variable in expected:
            top, inner = expected[variable]
            if inner is None:
                values[top] = value
            else:
                values[top] = {**(values.get(top) or {}), inner: value}
        elif variable.startswith("FACEPAY_") and variable not in NON_SETTING_ENV:
            _unknown_variable(variable, list(expected))


def _unknown_variable(variable: str, expected: list[str]) -> None:
    hint = _did_you_mean(variable, expected)
    if any(variable.startswith(f"FACEPAY_{name.upper()}_") for name in sections()):
        raise SettingsError(f"unknown setting variable {variable}{hint}")
    log.warning("environment variable %s is not a facepay setting%s", variable, hint)


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"


def _build_section(name: str, cls: type, value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(f"{name}.{key}", hints[key], v) for key, v in (value or {}).items()})


def _coerce(path: str, kind: Any, value: Any) -> Any:
    """A variable's text as the setting's type; other values are left to `validate`."""
    if not isinstance(value, str) or kind is str:
        return value
    options = set(typing.get_args(kind)) or {kind}
    text = value.strip()
    if type(None) in options and text.lower() in ("", "none", "null"):
        return None
    if bool in options:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"setting {path}: expected true or false, got {value!r}")
    try:
        if int in options:
            return int(text)
        if float in options:
            return float(text)
    except ValueError:
        expected = "an integer" if int in options else "a number"
        raise SettingsError(f"setting {path}: expected {expected}, got {value!r}") from None
    return value


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: low ≤ (or <) value ≤ high; None = no bound."""

    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_exclusive else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            if isinstance(self.low, int) and isinstance(self.high, int):
                return f"in {self.low}..{self.high}"
            return f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_exclusive else '≥'} {self.low:g}"
        return f"≤ {self.high:g}"


def at_least(low: int) -> Bounds:
    return Bounds(low=low)


POSITIVE = Bounds(low=0, low_exclusive=True)
RATIO = Bounds(0.0, 1.0)
COSINE = Bounds(-1.0, 1.0)
PORT = Bounds(0, 65535)
DEGREES = Bounds(0.0, 180.0)

# Every numeric setting, by its dotted name (tests/test_config.py checks that none is missing).
BOUNDS: dict[str, Bounds] = {
    "batch_size": at_least(1),
    "batch_wait_ms": at_least(0),
    "claim_idle_ms": at_least(1),
    "max_deliveries": at_least(1),
    "stream_retention_s": at_least(1),
    "image_retention_s": at_least(1),
    "stream_maxlen": at_least(1),
    "stream_partitions": Bounds(low=1, high=1024),
    "redis_wait_replicas": at_least(0),
    "redis_wait_timeout_ms": at_least(1),
    "max_image_bytes": at_least(1),
    "max_image_pixels": at_least(1),
    "min_face_px": at_least(1),
    "enroll_min_face_px": at_least(1),
    "enroll_min_sharpness": at_least(0),
    "enroll_min_antispoof": RATIO,
    "metrics_port": PORT,
    "gateway_threads": at_least(1),
    "worker_threads": at_least(1),
    "max_frame_age_s": at_least(1),
    "admin_max_age_s": at_least(1),
    "archive_retention_days": at_least(1),
    "archive_gather_grace_s": Bounds(low=0),
    "archive_orphan_after_s": at_least(60),
    "archive_sweep_every_s": at_least(1),
    "archive_quarantine_retry_s": at_least(1),
    "grpc_max_message_bytes": at_least(0),
    "grpc_max_calls_per_camera": at_least(1),
    "grpc_max_calls_per_backend": at_least(1),
    "grpc_max_calls_per_peer": at_least(1),
    "grpc_health_reserved_calls": at_least(1),
    "grpc_idle_timeout_s": POSITIVE,
    "grpc_max_connection_age_s": Bounds(low=0),
    "grpc_drain_s": Bounds(low=0),
    "grpc_stop_grace_s": Bounds(low=0),
    # The idle read blocks 1 s (worker.BLOCK_MS): a worker beats at least that often when healthy.
    "health_port": PORT,
    "health_stale_s": Bounds(low=2.0),
    "startup_wait_s": Bounds(low=0),
    "camera_max_fps": POSITIVE,
    "camera_burst": at_least(1),
    "queue_max_lag": at_least(0),
    "queue_max_memory_ratio": RATIO,
    "queue_max_memory_bytes": at_least(0),
    "session_max_frames": at_least(1),
    "session_max_duration_s": POSITIVE,
    "policy.threshold": COSINE,
    "policy.margin": Bounds(0.0, 2.0),
    "policy.min_agreeing_frames": at_least(1),
    "policy.max_disagreeing_ratio": RATIO,
    "policy.blink_closed_ratio": RATIO,
    "policy.blink_open_ratio": RATIO,
    "policy.min_passive_liveness": RATIO,
    "policy.session_timeout_s": POSITIVE,
    "limits.max_consecutive": at_least(1),
    "limits.first_delay_s": POSITIVE,
    "limits.hard_limit": at_least(1),
    "qdrant.hnsw_m": Bounds(4, 128),
    "qdrant.hnsw_ef_construct": Bounds(4, 4096),
    "qdrant.hnsw_ef": Bounds(1, 4096),
    "qdrant.full_scan_threshold_kb": at_least(1),
    "qdrant.indexing_threshold_kb": at_least(1),
    "qdrant.indexing_threads": Bounds(0, 64),
    "qdrant.oversampling": Bounds(1.0, 16.0),
    "qdrant.upsert_batch": Bounds(1, 100_000),
    "qdrant.shard_number": Bounds(1, 1024),
    "qdrant.replication_factor": Bounds(1, 16),
    "qdrant.write_consistency_factor": Bounds(1, 16),
    "qdrant.retries": Bounds(0, 20),
    "qdrant.retry_backoff_s": Bounds(0.0, 60.0),
    "qdrant.timeout_s": POSITIVE,
    "pose.max_abs_yaw": DEGREES,
    "pose.max_abs_pitch": DEGREES,
    "pose.max_abs_roll": DEGREES,
}

CHOICES: dict[str, tuple[str, ...]] = {"log_format": ("json", "text"), "qdrant.quantization": ("int8", "none")}


def _port_of(address: str) -> str | None:
    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not PORT.holds(int(port)):
        return f"expected host:port with a port in {PORT}, got {address!r}"
    return None


# Rules across settings and on the form of text settings: (setting named in the error, check → problem or None).
RULES: list[tuple[str, typing.Callable[[Settings], str | None]]] = [
    ("grpc_address", lambda s: _port_of(s.grpc_address)),
    (
        "policy.blink_closed_ratio",
        lambda s: (
            None
            if s.policy.blink_closed_ratio < s.policy.blink_open_ratio
            else f"must be below policy.blink_open_ratio ({s.policy.blink_open_ratio}), got {s.policy.blink_closed_ratio}"
        ),
    ),
    (
        "limits.hard_limit",
        lambda s: (
            None
            if s.limits.hard_limit >= s.limits.max_consecutive
            else f"must be ≥ limits.max_consecutive ({s.limits.max_consecutive}), got {s.limits.hard_limit}"
        ),
    ),
    (
        "qdrant.write_consistency_factor",
        lambda s: (
            None
            if s.qdrant.write_consistency_factor <= s.qdrant.replication_factor
            else f"must be ≤ qdrant.replication_factor ({s.qdrant.replication_factor}), got {s.qdrant.write_consistency_factor}"
        ),
    ),
]


def validate(settings: Settings) -> None:
    """Types, `BOUNDS`, `CHOICES` and `RULES`; raises SettingsError naming the first bad setting."""
    for path, kind, value in _leaves(settings):
        _check_type(path, kind, value)
        if value is None:
            continue
        if path in BOUNDS and not BOUNDS[path].holds(value):
            raise SettingsError(f"setting {path} must be {BOUNDS[path]}, got {value!r}")
        if path in CHOICES and value not in CHOICES[path]:
            raise SettingsError(f"setting {path} must be one of {', '.join(CHOICES[path])}, got {value!r}")
    for path, rule in RULES:
        problem = rule(settings)
        if problem:
            raise SettingsError(f"setting {path}: {problem}")


def _leaves(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise SettingsError(f"setting {prefix}{f.name}: expected {hints[f.name].__name__}, got {value!r}")
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], value


def _check_type(path: str, kind: Any, value: Any) -> None:
    options = set(typing.get_args(kind)) or {kind}
    if value is None and type(None) in options:
        return
    if bool in options:
        ok, expected = isinstance(value, bool), "true or false"
    elif int in options:
        ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    elif float in options:
        ok, expected = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    elif str in options:
        ok, expected = isinstance(value, str), "text"
    else:
        return
    if not ok:
        raise SettingsError(f"setting {path}: expected {expected}, got {value!r}")
