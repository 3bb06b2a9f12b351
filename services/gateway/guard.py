"""Admission control in front of the gateway's handlers: who may take a thread, how many, for
how long, and how fast a camera may queue frames.

- **Before a thread is taken** (a server interceptor, run on the call's headers): the caller is
  authenticated from its metadata — camera id + token, a store's backend token, the operator
  token; health checks and reflection are public. A caller that fails gets its status at once
  from a handler that reads nothing.
- **Every call is admitted into a share**: the business calls share `gateway_threads`; each
  camera, each store's backend and each peer IP address has its own cap; health checks have a
  reserve of their own, so the liveness probe is answered however busy the gateway is.
- **Idle calls end**: a call that waits longer than `grpc_idle_timeout_s` for the client's next
  message (or a unary call's only one) is cancelled, so silent connections cannot hold threads.
- **Frames**: a token bucket per camera, and back-pressure from the queue (the detector's lag
  on the frames stream, Redis memory): RESOURCE_EXHAUSTED, which the camera client retries.
- **Sessions**: a decided session takes no more frames; frames and duration per session are
  capped (counters in Redis, shared by every gateway replica).
- **Redis errors are statuses**: out of memory → RESOURCE_EXHAUSTED; read-only (a failover),
  loading, unreachable → UNAVAILABLE. Never UNKNOWN.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import redis

from facepay.config import Settings
from facepay.runtime import metrics
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import reset_connections
from services.gateway.cameras import AccessDenied, CameraRegistry

log = logging.getLogger(__name__)

SERVICE = "/facepay.v1.FaceGateway/"
CAMERA_METHODS = {SERVICE + m for m in ("StreamFrames", "SubmitFrame", "EndSession")}
BACKEND_METHODS = {SERVICE + "SubscribeDecisions"}
OPERATOR_METHODS = {SERVICE + "Enroll"}
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MESSAGE_OVERHEAD_BYTES = 64 << 10  # a frame's fields around its image
QUEUE_CHECK_INTERVAL_S = 0.5  # how stale the lag/memory reading may be
HEALTH_BODY_TIMEOUT_S = 2.0  # a probe sends its request at once: a silent one gives its slot back soon


class FrameRefused(Exception):
    """A frame or call refused with a gRPC status and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---- Redis errors as gRPC statuses ----------------------------------------------------------


@contextlib.contextmanager
def redis_errors_as_status(client: redis.Redis, what: str) -> Iterator[None]:
    """Full, read-only, loading or unreachable Redis: back-pressure the camera retries."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        metrics.FRAMES_REJECTED.labels("RESOURCE_EXHAUSTED").inc()
        raise FrameRefused(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: the queue is full, retry later ({exc})"
        ) from exc
    except redis.exceptions.ReadOnlyError as exc:
        # After a failover this connection points at a replica: reconnect on the next call
        # (a DNS name or a sentinel-managed address then reaches the new primary).
        reset_connections(client)
        metrics.FRAMES_REJECTED.labels("UNAVAILABLE").inc()
        raise FrameRefused(grpc.StatusCode.UNAVAILABLE, f"{what}: the queue is read-only (failover), retry") from exc
    except (
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.ClusterError,
        redis.exceptions.TryAgainError,
        redis.exceptions.AskError,
        redis.exceptions.RedisClusterException,
    ) as exc:
        # BusyLoadingError is a ConnectionError; on a cluster: a failover or a slot moving
        metrics.FRAMES_REJECTED.labels("UNAVAILABLE").inc()
        raise FrameRefused(grpc.StatusCode.UNAVAILABLE, f"{what}: queue unavailable, retry: {exc}") from exc


# ---- who is calling --------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    kind: str  # camera | backend | operator | health | public
    name: str  # camera id, store id, "operator", "" for public callers


def authenticate(method: str, metadata: dict[str, str], settings: Settings, registry: CameraRegistry) -> Caller:
    """The caller of `method`, from its headers alone; FrameRefused when they do not hold."""
    token = metadata.get("authorization", "").removeprefix("Bearer ").strip()
    try:
        if method in CAMERA_METHODS:
            return Caller("camera", registry.camera(metadata.get("x-camera-id", ""), token).camera_id)
        if method in BACKEND_METHODS:
            return Caller("backend", registry.backend_for_token(token).store_id)
    except AccessDenied as denied:
        raise FrameRefused(grpc.StatusCode.UNAUTHENTICATED, str(denied)) from denied
    if method in OPERATOR_METHODS:
        if not settings.operator_token or not hmac.compare_digest(token.encode(), settings.operator_token.encode()):
            raise FrameRefused(grpc.StatusCode.UNAUTHENTICATED, "Enroll needs the operator token")
        return Caller("operator", "operator")
    return Caller("health" if method == HEALTH_CHECK else "public", "")


# ---- concurrency shares ------------------------------------------------------------------------


class Shares:
    """Counts of calls in progress per share; admission takes one slot of every share or none."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.active: dict[str, int] = defaultdict(int)

    def _limits(self, caller: Caller, peer: str) -> list[tuple[str, int, str]]:
        s = self.settings
        if caller.kind == "health":  # a reserve of its own, and no one address can hold all of it
            return [
                ("health", s.grpc_health_reserved_calls, "health checks"),
                (f"health:{peer}", max(1, s.grpc_health_reserved_calls // 2), f"health checks from {peer}"),
            ]
        limits = [
            ("all", s.gateway_threads, "the gateway's calls"),
            (f"peer:{peer}", s.grpc_max_calls_per_peer, f"calls from {peer}"),
        ]
        if caller.kind == "camera":
            limits.append((f"camera:{caller.name}", s.grpc_max_calls_per_camera, f"calls of camera {caller.name}"))
        elif caller.kind == "backend":
            limits.append(
                (f"backend:{caller.name}", s.grpc_max_calls_per_backend, f"backend calls of store {caller.name}")
            )
        return limits

    def admit(self, caller: Caller, peer: str) -> Callable[[], None]:
        """Take a slot in each of the caller's shares; returns the (idempotent) release."""
        limits = self._limits(caller, peer)
        with self.lock:
            for key, limit, what in limits:
                if self.active[key] >= limit:
                    raise FrameRefused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many concurrent {what} (limit {limit}), retry later"
                    )
            for key, _, _ in limits:
                self.active[key] += 1
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if released.is_set():
                    return
                released.set()
                for key, _, _ in limits:
                    self.active[key] -= 1
                    if not self.active[key]:
                        del self.active[key]

        return release


def peer_address(context: grpc.ServicerContext) -> str:
    """The caller's IP address without its port: one machine, however many connections."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


def check_certificate_names(camera_id: str, context: grpc.ServicerContext) -> None:
    """A camera that presented a client certificate speaks only as the camera it names."""
    names = {
        n.decode()
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for n in context.auth_context().get(key, [])
    }
    if names and camera_id not in names:
        metrics.FRAMES_REJECTED.labels("PERMISSION_DENIED").inc()
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the client certificate does not name camera {camera_id}")


# ---- idle calls ------------------------------------------------------------------------------


class IdleWatch:
    """Ends calls that wait longer than the idle timeout for the client's next message."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.waiting: dict[int, tuple[float, float, grpc.ServicerContext]] = {}
        self.stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._sweep, name="gateway-idle-watch", daemon=True).start()

    def requests(self, iterator: Iterator, context: grpc.ServicerContext, timeout_s: float | None = None) -> Iterator:
        """`iterator`, with the time spent waiting in it watched."""
        key, deadline_s = id(context), timeout_s or self.timeout_s
        while True:
            with self.lock:
                self.waiting[key] = (time.monotonic() + deadline_s, deadline_s, context)
            try:
                item = next(iterator)
            except (StopIteration, grpc.RpcError):  # the end, or the call was cancelled (idle, client gone)
                return
            finally:
                with self.lock:
                    self.waiting.pop(key, None)
            yield item

    def _sweep(self) -> None:
        interval = min(0.5, self.timeout_s / 4)
        while not self.stop.wait(interval):
            now = time.monotonic()
            with self.lock:
                idle = [(ctx, waited) for deadline, waited, ctx in self.waiting.values() if now > deadline]
            for context, waited in idle:
                log.info("idle call ended", extra={"peer": context.peer(), "idle_s": waited})
                context.cancel()


# ---- the interceptor -------------------------------------------------------------------------


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` without reading a single message."""

    def refuse(_requests, context):
        context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


class HealthCheckOnly(grpc.ServerInterceptor):
    """For the plaintext health port: one-shot Check only (a Watch stream would hold a thread)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is not None and handler_call_details.method != HEALTH_CHECK:
            return _refusing(handler, grpc.StatusCode.UNIMPLEMENTED, "this port answers health checks only")
        return handler


class Guard(grpc.ServerInterceptor):
    def __init__(self, settings: Settings, registry: CameraRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.shares = Shares(settings)
        self.idle = IdleWatch(settings.grpc_idle_timeout_s)

    def close(self) -> None:
        self.idle.stop.set()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        try:
            caller = authenticate(handler_call_details.method, metadata, self.settings, self.registry)
        except FrameRefused as refused:
            if handler_call_details.method in CAMERA_METHODS:
                metrics.FRAMES_REJECTED.labels(refused.code.name).inc()
            return _refusing(handler, refused.code, str(refused))
        return self._guarded(handler, caller)

    def _guarded(self, handler: grpc.RpcMethodHandler, caller: Caller) -> grpc.RpcMethodHandler:
        """The handler, taking its request(s) as a stream: the thread starts at once, is
        admitted into the caller's shares, and waits for the body under the idle watch."""
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def start(requests, context) -> tuple[Callable[[], None], object]:
            if caller.kind == "camera":
                check_certificate_names(caller.name, context)
            try:
                release = self.shares.admit(caller, peer_address(context))
            except FrameRefused as refused:
                if caller.kind == "camera":
                    metrics.FRAMES_REJECTED.labels(refused.code.name).inc()
                context.abort(refused.code, str(refused))
            context.add_callback(release)
            requests = self.idle.requests(requests, context, HEALTH_BODY_TIMEOUT_S if caller.kind == "health" else None)
            if handler.request_streaming:
                return release, requests
            request = next(requests, None)
            if request is None:
                release()
                context.abort(
                    grpc.StatusCode.CANCELLED if context.is_active() else grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request within {self.settings.grpc_idle_timeout_s:g} s",
                )
            return release, request

        if handler.response_streaming:

            def run_streaming(requests, context):
                release, argument = start(requests, context)
                try:
                    yield from inner(argument, context)
                finally:
                    release()

            return grpc.stream_stream_rpc_method_handler(
                run_streaming, handler.request_deserializer, handler.response_serializer
            )

        def run_unary(requests, context):
            release, argument = start(requests, context)
            try:
                return inner(argument, context)
            finally:
                release()

        return grpc.stream_unary_rpc_method_handler(
            run_unary, handler.request_deserializer, handler.response_serializer
        )


def max_message_bytes(settings: Settings) -> int:
    return settings.grpc_max_message_bytes or settings.max_image_bytes + MESSAGE_OVERHEAD_BYTES


# ---- frames: per-camera rate, queue back-pressure, sessions --------------------------------------


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class FrameLimits:
    """Per-camera frame rate (in this gateway replica) and the queue's back-pressure."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.lock = threading.Lock()
        self.buckets: dict[str, TokenBucket] = {}
        self.queue_refusal: str | None = None
        self.checked_at = 0.0

    def admit(self, camera_id: str) -> None:
        s = self.settings
        if s.camera_max_fps > 0:
            with self.lock:
                bucket = self.buckets.setdefault(camera_id, TokenBucket(s.camera_max_fps, max(s.camera_burst, 1)))
                allowed = bucket.take()
            if not allowed:
                raise FrameRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"camera {camera_id} is over its frame rate of {s.camera_max_fps:g}/s, retry later",
                )
        refusal = self._queue_refusal()
        if refusal:
            raise FrameRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    def _queue_refusal(self) -> str | None:
        """Why the queue takes no frames now (lag, memory), read at most every 0.5 s."""
        with self.lock:
            if time.monotonic() - self.checked_at < QUEUE_CHECK_INTERVAL_S:
                return self.queue_refusal
            self.checked_at = time.monotonic()
        refusal = self._read_queue_state()
        with self.lock:
            self.queue_refusal = refusal
        return refusal

    def _read_queue_state(self) -> str | None:
        s = self.settings
        with redis_errors_as_status(self.redis, "queue state"):
            if s.queue_max_memory_ratio > 0 or s.queue_max_memory_bytes > 0:
                memory = self.redis.info("memory")
                used, ceiling = int(memory["used_memory"]), int(memory.get("maxmemory") or 0)
                if s.queue_max_memory_ratio > 0 and ceiling and used > s.queue_max_memory_ratio * ceiling:
                    return (
                        f"queue memory {used >> 20} MiB is above {s.queue_max_memory_ratio:.0%} of Redis maxmemory "
                        f"({ceiling >> 20} MiB): the pipeline is behind, retry later"
                    )
                if s.queue_max_memory_bytes > 0 and used > s.queue_max_memory_bytes:
                    return f"queue memory {used >> 20} MiB is above the budget of {s.queue_max_memory_bytes >> 20} MiB, retry later"
            if s.queue_max_lag > 0:
                lag = self._frames_lag()
                if lag > s.queue_max_lag:
                    return f"the detector's lag on the frames stream is {lag} frames (limit {s.queue_max_lag}), retry later"
        return None

    def _frames_lag(self) -> int:
        """The detector's lag summed over the frames stream's partitions."""
        total = 0
        for stream in Partitions.of(self.settings).streams("frames"):
            try:
                groups = self.redis.xinfo_groups(stream)
            except redis.ResponseError:  # no stream yet
                continue
            total += max((int(g.get("lag") or 0) for g in groups), default=0)
        return total


def check_session(
    client: redis.Redis, settings: Settings, decided_key: str, store_id: str, session_id: str, frame: bool
) -> None:
    """Refuse frames for a decided session, and work beyond the per-session frame and time caps.
    An end marker for a decided session is still taken: after an early decision it is the
    camera's normal last word, and the recognizer ignores it."""
    session = f"{store_id}/{session_id}"
    partitions = Partitions.of(settings)  # counters and decided key: the session's slot
    counters = partitions.session_key(session, "gateway-session", session)
    now_ms = int(time.time() * 1000)
    with redis_errors_as_status(client, "session check"):
        pipe = client.pipeline(transaction=False)
        pipe.exists(partitions.session_key(session, decided_key))
        pipe.hsetnx(counters, "first_ms", now_ms)
        pipe.hincrby(counters, "frames", 1 if frame else 0)
        pipe.hget(counters, "first_ms")
        pipe.expire(counters, int(settings.session_max_duration_s) + 3600)
        decided, _, frames, first_ms, _ = pipe.execute()
    if decided and frame:
        raise FrameRefused(
            grpc.StatusCode.FAILED_PRECONDITION, f"session {session_id} already decided: start a new session id"
        )
    if frame and frames > settings.session_max_frames:
        raise FrameRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {session_id} already has {settings.session_max_frames} frames: start a new session id",
        )
    if (now_ms - int(first_ms)) / 1000 > settings.session_max_duration_s:
        raise FrameRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {session_id} has lasted longer than {settings.session_max_duration_s:g} s: start a new session id",
        )
