"""Prometheus metrics shared by the gateway and the workers (one registry per process)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES_IN = Counter("facepay_messages_in_total", "Stream entries read", ["stage"])
MESSAGES_OUT = Counter("facepay_messages_out_total", "Stream entries written", ["stage", "stream"])
MESSAGES_FAILED = Counter("facepay_messages_failed_total", "Entries whose processing raised", ["stage"])
DEAD_LETTERS = Counter("facepay_dead_letters_total", "Entries moved to the dead-letter stream", ["stage", "reason"])
UNAUTHENTICATED = Counter(
    "facepay_unauthenticated_total", "Entries refused: signature or frame origin does not verify", ["stage"]
)
DEFERRED = Counter(
    "facepay_deferred_total",
    "Entries a stage left pending for now for a reason of their own "
    "(e.g. a tenant without an archive key); retried, never counted as failures",
    ["stage"],
)
DEFERRED_ENTRIES = Gauge(
    "facepay_deferred_entries",
    "Entries this worker holds deferred now, per reason and scope (e.g. no_archive_key and the "
    "tenant); the series goes once none is left. Per replica: sum over replicas",
    ["stage", "reason", "scope"],
)
DEFERRED_OLDEST = Gauge(
    "facepay_deferred_oldest_seconds",
    "Age of the oldest entry this worker holds deferred, per reason and scope (since it was "
    "written to its stream): how long e.g. a tenant's sessions have been held",
    ["stage", "reason", "scope"],
)
RECLAIMED = Counter("facepay_reclaimed_total", "Pending entries taken over from idle consumers", ["stage"])
BACKPRESSURE = Counter(
    "facepay_redis_backpressure_total",
    "Waits because Redis refused for now (oom, readonly, loading, masterdown, unavailable)",
    ["stage", "kind"],
)
STREAM_LENGTH = Gauge("facepay_stream_length", "Entries in a stream after the last trimming pass", ["stream"])
BATCH_SIZE = Histogram("facepay_batch_size", "Entries per processed batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64))
STAGE_SECONDS = Histogram(
    "facepay_stage_seconds",
    "Time to process one batch",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GROUP_LAG = Gauge(
    "facepay_group_lag", "Entries not yet delivered to the consumer group (autoscaler input)", ["stage", "stream"]
)
HEARTBEAT_AGE = Gauge(
    "facepay_worker_heartbeat_age_seconds",
    "Seconds since the worker loop last turned (beats every turn; /livez fails past health_stale_s)",
    ["stage"],
)
GROUP_PENDING = Gauge("facepay_group_pending", "Entries delivered but not acknowledged", ["stage", "stream"])
FRAMES_ACCEPTED = Counter("facepay_gateway_frames_total", "Frames queued by the gateway", ["store"])
FRAMES_REJECTED = Counter("facepay_gateway_frames_rejected_total", "Frames refused by the gateway", ["code"])
DECISIONS = Counter("facepay_decisions_total", "Payment decisions emitted", ["decision", "reason"])
DECISION_LATENCY = Histogram(
    "facepay_frame_to_decision_seconds",
    "Gateway receipt of a session's first frame to its decision",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)

ARCHIVED = Counter(
    "facepay_archive_sessions_total",
    "Sessions the archiver archived (complete, or with frames missing) or released undecided",
    ["result"],
)
ARCHIVE_QUARANTINED = Counter(
    "facepay_archive_quarantined_sessions_total",
    "Sessions kept outside their store's hash chain because the chain refuses "
    "appends (tampered or unreadable); alert on any increase",
    ["tenant", "store"],
)
ARCHIVE_HELD = Counter(
    "facepay_archive_held_sessions_total",
    "Tries to archive a decided session held back because its tenant has no key in "
    "the archive keys file (retried until the key is added; alert on any increase)",
    ["tenant"],
)
ARCHIVE_LEFT_OUT = Counter(
    "facepay_archive_entries_left_out_total", "Entries not archived: they did not verify", ["stream"]
)


def serve_metrics(port: int, address: str = "127.0.0.1") -> WSGIServer | None:
    """Serve /metrics on address:port (loopback unless told otherwise: the figures describe the
    traffic); returns the HTTP server, or None when port is 0."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=address)
    return server
