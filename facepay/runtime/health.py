"""A worker's health for Kubernetes' probes: a heartbeat the worker loop beats, served over HTTP.

- `GET /startupz` → 200 once the stage has loaded its models and joined its consumer group.
- `GET /livez` → 200 while the loop turns: it beats every turn (an idle read blocks 1 s) and while
  it waits out a Redis outage; 503 once no beat came for `health_stale_s` (a stage hung in
  `process`, a deadlock) — a restart is the cure. Before start-up ends it is 503 like /startupz,
  so a startup probe may use either (Kubernetes holds the liveness probe until that one passes);
  a liveness probe without a startup probe would kill a worker loading its models.
- `GET /readyz` → 200 when started, live, and Redis answered within `health_stale_s` with the
  worker not waiting anything out; 503 while Redis is unreachable, loading, read-only or full, or
  a stage dependency holds the batch back (a restart cures none of these: only readiness fails).
  Its body lists the entries the stage defers (`deferred`: per reason and scope, e.g. a tenant
  without an archive key: how many, the oldest's age) — still 200: the worker processes the rest,
  a restart or a rollout cures nothing, the operator must fix a configuration (metrics, logs).

A small stdlib HTTP server in a daemon thread; each answer is a line of JSON that says why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class Heartbeat:
    """What the probes read: when the loop last turned, whether Redis answers, what is awaited."""

    def __init__(self, stale_s: float) -> None:
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._beat_at = time.monotonic()
        self._redis_answered_at: float | None = None
        self._started = False
        self._waiting_for: str | None = None
        self._deferred: list[dict] = []

    def beat(self) -> None:
        with self._lock:
            self._beat_at = time.monotonic()

    def redis_answered(self) -> None:
        """Redis took a command: the loop is not waiting anything out."""
        with self._lock:
            self._beat_at = self._redis_answered_at = time.monotonic()
            self._waiting_for = None

    def waiting(self, what: str) -> None:
        """The loop holds its work until `what` passes (a beat: waiting out is not being stuck)."""
        with self._lock:
            self._beat_at = time.monotonic()
            self._waiting_for = what

    def deferring(self, summary: list[dict]) -> None:
        """What the stage defers now, per reason and scope (for /readyz's body)."""
        with self._lock:
            self._deferred = list(summary)

    def deferred(self) -> list[dict]:
        with self._lock:
            return list(self._deferred)

    def started(self) -> None:
        with self._lock:
            self._started = True

    def age_s(self) -> float:
        """Seconds since the loop last turned (the facepay_worker_heartbeat_age_seconds gauge)."""
        return time.monotonic() - self._beat_at

    def startup(self) -> Verdict:
        return Verdict(True, "started") if self._started else Verdict(False, self._waiting_for or "starting")

    def live(self) -> Verdict:
        if not self._started:
            return self.startup()
        age = self.age_s()
        if age > self.stale_s:
            return Verdict(False, f"the worker loop has not turned for {age:.1f} s (health_stale_s {self.stale_s:g})")
        return Verdict(True, f"heartbeat {age:.1f} s ago")

    def ready(self) -> Verdict:
        with self._lock:
            waiting_for, answered_at, started = self._waiting_for, self._redis_answered_at, self._started
        if not started:
            return Verdict(False, waiting_for or "starting")
        live = self.live()
        if not live.ok:
            return live
        if waiting_for:
            return Verdict(False, f"waiting out: {waiting_for}")
        if answered_at is None or time.monotonic() - answered_at > self.stale_s:
            return Verdict(False, "redis has not answered recently")
        deferred = self.deferred()
        if deferred:  # not a failure: the rest is processed; the operator must act (see the body)
            held = ", ".join(f"{d['stage']} {d['reason']} {d['scope']!r}: {d['entries']}" for d in deferred)
            return Verdict(True, f"ready; entries deferred ({held})")
        return Verdict(True, "ready")


PROBES = {"/livez": Heartbeat.live, "/readyz": Heartbeat.ready, "/startupz": Heartbeat.startup}


class HealthServer:
    """/livez, /readyz and /startupz of one heartbeat on address:port, in a daemon thread."""

    def __init__(self, heartbeat: Heartbeat, port: int, address: str = "127.0.0.1") -> None:
        class Probe(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's name
                probe = PROBES.get(self.path.split("?", 1)[0])
                if probe is None:
                    self._answer(404, {"error": f"no such probe; try {', '.join(PROBES)}"})
                    return
                verdict = probe(heartbeat)
                body: dict = {
                    "ok": verdict.ok,
                    "reason": verdict.reason,
                    "heartbeat_age_s": round(heartbeat.age_s(), 3),
                }
                if probe is Heartbeat.ready:
                    body["deferred"] = heartbeat.deferred()
                self._answer(200 if verdict.ok else 503, body)

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode() + b"\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: not worth a log line
                pass

        self.httpd = ThreadingHTTPServer((address, port), Probe)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        self._thread.start()
        log.info("health probes listening", extra={"address": address, "port": self.port, "paths": list(PROBES)})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_health(heartbeat: Heartbeat, port: int, address: str = "127.0.0.1") -> HealthServer | None:
    """The probes' server, or None when port is 0 (off)."""
    return HealthServer(heartbeat, port, address) if port else None
