"""Gateway: cameras stream frames in over gRPC; each valid frame is queued durably on the
frames stream (XADD, acknowledged to the camera only after Redis has it); payment backends
subscribe to the decisions of their store; operators enroll users.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
import uuid
from concurrent import futures
from typing import NoReturn

import grpc
import msgpack
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facepay.config import Settings
from facepay.contract import pb, reason_value, rpc
from facepay.decisions import DecisionReader, to_proto
from facepay.grpc_tls import is_loopback, server_credentials
from facepay.images import ImageError, decode_image
from facepay.keys import load_keyring
from facepay.messages import FIELD, FrameMsg, FrameRef, Message, SessionEndMsg
from facepay.runtime import metrics
from facepay.runtime.envelope import Unauthenticated, attest, open_entry, seal
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import REDIS_ERRORS, TRANSIENT, connect, durable_xadd
from facepay.runtime.stage import session_of
from facepay.sessions import decided_key, session_key
from facepay.vocabulary import EnrollmentStatus, Purpose
from services.gateway.cameras import AccessDenied, Camera, CameraRegistry
from services.gateway.guard import (
    FrameLimits,
    FrameRefused,
    Guard,
    HealthCheckOnly,
    check_session,
    max_message_bytes,
    redis_errors_as_status,
)

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ENTRY_ID = re.compile(r"^\d+(-\d+)?$")
PHONE_SUFFIX = re.compile(r"^\d{0,8}$")
ENROLL_TIMEOUT_S = 120.0
REFUSAL_THREADS = 8  # beyond the shares: threads that answer refused calls at once
# Health service names: "" (and the API's own) say "send me calls" — NOT_SERVING from SIGTERM on,
# for readiness; LIVENESS says "this process answers" and stays SERVING while it drains, so a
# liveness probe never restarts a gateway that is finishing its calls.
SERVING_SERVICES = ("", "facepay.v1.FaceGateway")
LIVENESS_SERVICE = "liveness"


class Gateway(rpc.FaceGatewayServicer):
    def __init__(self, settings: Settings, registry: CameraRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.redis = connect(settings.redis_url)
        # Each session's frames go to its partition's stream (facepay.runtime.partitions).
        self.partitions = Partitions.of(settings)
        # It signs every entry and attests every frame's origin: no key, no start.
        self.keys = load_keyring(settings.key_file, settings.trusted_keys_file, "gateway")
        self.frame_limits = FrameLimits(settings, self.redis)

    # ---- cameras ---------------------------------------------------------------------------
    def StreamFrames(self, request_iterator, context):
        camera = self._camera(context)
        for message in request_iterator:
            body = message.WhichOneof("body")
            try:
                if body == "frame":
                    entry_id = self._queue_frame(camera, message.frame)
                    yield pb.FrameAck(
                        session_id=message.frame.session_id, sequence=message.frame.sequence, entry_id=entry_id
                    )
                elif body == "end":
                    entry_id = self._queue_end(camera, message.end)
                    yield pb.FrameAck(session_id=message.end.session_id, sequence=-1, entry_id=entry_id)
                else:
                    raise FrameRefused(grpc.StatusCode.INVALID_ARGUMENT, "empty CameraMessage")
            except FrameRefused as refused:
                frame = getattr(message, body) if body else None
                yield pb.FrameAck(
                    session_id=getattr(frame, "session_id", ""),
                    sequence=getattr(frame, "sequence", -1),
                    code=refused.code.value[0],
                    message=str(refused),
                )

    def SubmitFrame(self, request, context):
        camera = self._camera(context)
        try:
            entry_id = self._queue_frame(camera, request)
        except FrameRefused as refused:
            _abort(context, refused.code, str(refused))
        return pb.FrameAck(session_id=request.session_id, sequence=request.sequence, entry_id=entry_id)

    def EndSession(self, request, context):
        camera = self._camera(context)
        try:
            entry_id = self._queue_end(camera, request)
        except FrameRefused as refused:
            _abort(context, refused.code, str(refused))
        return pb.FrameAck(session_id=request.session_id, sequence=-1, entry_id=entry_id)

    def _camera(self, context) -> Camera:
        metadata = dict(context.invocation_metadata())
        token = metadata.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            return self.registry.camera(metadata.get("x-camera-id", ""), token)
        except AccessDenied as denied:
            metrics.FRAMES_REJECTED.labels("UNAUTHENTICATED").inc()
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(denied))

    def _check_origin(self, camera: Camera, camera_id: str, store_id: str, session_id: str) -> None:
        if camera_id and camera_id != camera.camera_id:
            raise FrameRefused(
                grpc.StatusCode.PERMISSION_DENIED, f"camera {camera.camera_id} cannot submit as {camera_id}"
            )
        if store_id != camera.store.store_id:
            raise FrameRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"camera {camera.camera_id} belongs to store {camera.store.store_id}, not {store_id!r}",
            )
        if not SESSION_ID.match(session_id):
            raise FrameRefused(grpc.StatusCode.INVALID_ARGUMENT, "session_id must be 1-128 chars of [A-Za-z0-9._:-]")

    def _queue_frame(self, camera: Camera, frame) -> str:
        try:
            self._check_origin(camera, frame.camera_id, frame.store_id, frame.session_id)
            if not 0 <= frame.sequence < self.settings.session_max_frames:
                raise FrameRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"sequence must be 0 … {self.settings.session_max_frames - 1} (frames of one session)",
                )
            if not PHONE_SUFFIX.match(frame.phone_suffix):
                raise FrameRefused(grpc.StatusCode.INVALID_ARGUMENT, "phone_suffix must be at most 8 digits")
            try:
                decode_image(
                    frame.image,
                    self.settings.max_image_bytes,
                    self.settings.max_image_pixels,
                    declared=(frame.width, frame.height),
                )
            except ImageError as bad:
                raise FrameRefused(grpc.StatusCode.INVALID_ARGUMENT, f"frame {frame.sequence}: {bad}") from bad
            self.frame_limits.admit(camera.camera_id)
            self._check_session(camera, frame.session_id, frame=True)
        except FrameRefused as refused:
            metrics.FRAMES_REJECTED.labels(refused.code.name).inc()
            log.info(
                "frame refused",
                extra={
                    "camera": camera.camera_id,
                    "session_id": frame.session_id,
                    "code": refused.code.name,
                    "error": str(refused),
                },
            )
            raise
        ref = self._ref(
            camera,
            frame.session_id,
            frame.sequence,
            frame.capture_time_ms,
            image=frame.image,
            phone_suffix=frame.phone_suffix,
        )
        entry_id = self._xadd(FrameMsg(ref=ref, image=frame.image))
        metrics.FRAMES_ACCEPTED.labels(camera.store.store_id).inc()
        return entry_id

    def _queue_end(self, camera: Camera, end) -> str:
        self._check_origin(camera, end.camera_id, end.store_id, end.session_id)
        if not 0 < end.frame_count <= self.settings.session_max_frames:
            raise FrameRefused(
                grpc.StatusCode.INVALID_ARGUMENT, f"frame_count must be 1 … {self.settings.session_max_frames}"
            )
        self._check_session(camera, end.session_id, frame=False)
        ref = self._ref(camera, end.session_id, -1, 0)
        return self._xadd(SessionEndMsg(ref=ref, frame_count=end.frame_count))

    def _check_session(self, camera: Camera, session_id: str, frame: bool) -> None:
        key = decided_key(session_key(camera.store.store_id, session_id))
        check_session(self.redis, self.settings, key, camera.store.store_id, session_id, frame)

    def _ref(
        self, camera: Camera, session_id: str, sequence: int, captured_ms: int, image: bytes | None = None, **extra
    ) -> FrameRef:
        ref = FrameRef(
            session_id=session_id,
            store_id=camera.store.store_id,
            camera_id=camera.camera_id,
            sequence=sequence,
            captured_ms=captured_ms,
            tenant_id=camera.store.tenant,
            trace_id=uuid.uuid4().hex[:16],
            received_ms=int(time.time() * 1000),
            **extra,
        )
        return attest(ref, self.keys.signer, image)

    def _xadd(self, message: Message) -> str:
        """Queue durably; a Redis that cannot take it is UNAVAILABLE or RESOURCE_EXHAUSTED, so
        the camera retries the frame."""
        stream = self.partitions.stream("frames", session_of(message))
        fields = seal({FIELD: message.encode()}, stream, self.keys.signer)
        with redis_errors_as_status(self.redis, "queue"):
            # No inline MAXLEN: it would trim frames no stage has read yet. The workers trim
            # safely (never past a group's delivery point); a full queue is back-pressure.
            entry_id = durable_xadd(self.redis, stream, fields, self.settings)
        return entry_id.decode()

    # ---- enrollment ------------------------------------------------------------------------
    def Enroll(self, request, context):
        metadata = dict(context.invocation_metadata())
        token = metadata.get("authorization", "").removeprefix("Bearer ").strip()
        if not self.settings.operator_token or not hmac.compare_digest(
            token.encode(), self.settings.operator_token.encode()
        ):
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "Enroll needs the operator token")
        if not request.user_id or not SESSION_ID.match(request.user_id):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "user_id must be 1-128 chars of [A-Za-z0-9._:-]")
        if not request.images:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no images")
        for index, image in enumerate(request.images):
            try:
                decode_image(image, self.settings.max_image_bytes, self.settings.max_image_pixels)
            except ImageError as bad:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {bad}")
        try:
            result = self._run_enrollment(request)
        except TRANSIENT as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"queue unavailable, retry: {exc}")
        except FrameRefused as refused:
            _abort(context, refused.code, str(refused))
        if result is None:
            _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "the pipeline did not finish the enrollment in time")
        return _enroll_response(result)

    def _run_enrollment(self, request) -> dict | None:
        session_id = f"enroll-{uuid.uuid4().hex}"
        results_stream = self.partitions.stream("enrollments", f"/{session_id}")  # its partition (store "")
        last = self.redis.xrevrange(results_stream, count=1)
        cursor = last[0][0] if last else b"0-0"
        now = int(time.time() * 1000)
        common = dict(
            session_id=session_id,
            store_id="",
            camera_id="enroll",
            captured_ms=now,
            purpose=Purpose.ENROLL,
            user_id=request.user_id,
            tenant_id=request.tenant_id or "default",
            phone_suffix=request.metadata.get("phone_suffix", ""),
            received_ms=now,
        )
        for index, image in enumerate(request.images):
            self._xadd(FrameMsg(ref=attest(FrameRef(sequence=index, **common), self.keys.signer, image), image=image))
        end_ref = attest(FrameRef(sequence=-1, **common), self.keys.signer)
        self._xadd(SessionEndMsg(ref=end_ref, frame_count=len(request.images)))
        deadline = time.monotonic() + ENROLL_TIMEOUT_S
        while time.monotonic() < deadline:
            for _, items in self.redis.xread({results_stream: cursor}, block=1000, count=100) or []:
                for entry_id, fields in items:
                    cursor = entry_id
                    if fields.get(b"session", b"").decode() == session_id:
                        result = self._enrollment_result(fields, results_stream)
                        if result and result.pop("session_id", None) == session_id:
                            return result
        return None

    def _enrollment_result(self, fields: dict, stream: str) -> dict | None:
        """The recognizer's signed result, or None for anything else written there."""
        try:
            return msgpack.unpackb(open_entry(fields, stream, self.keys.trusted, {"recognizer"})[1])
        except Unauthenticated as exc:
            log.warning("unauthenticated enrollment result ignored", extra={"error": str(exc)})
            return None

    # ---- payment backends ------------------------------------------------------------------
    def SubscribeDecisions(self, request, context):
        metadata = dict(context.invocation_metadata())
        token = metadata.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            self.registry.backend(request.store_id, token)
        except AccessDenied as denied:
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(denied))
        if request.after_entry_id and not ENTRY_ID.match(request.after_entry_id):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "after_entry_id must be a stream id like 1700000000000-0")
        try:
            reader = DecisionReader(self.redis, self.partitions, request.after_entry_id or None)
        except TRANSIENT as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"decisions stream unavailable, retry: {exc}")
        while context.is_active():
            try:
                items = reader.read(block_ms=1000)
            except REDIS_ERRORS:
                time.sleep(0.5)
                continue
            for entry_id, fields in items:
                event = _event_of_store(entry_id, fields, request.store_id)
                if event is not None:
                    yield event


def _event_of_store(entry_id: bytes, fields: dict[bytes, bytes], store_id: str) -> pb.DecisionEvent | None:
    """The entry as a DecisionEvent if its signed payload names this store, else None.

    The store is read inside the signed payload, never from the unsigned stream field (which
    anyone who can write to the stream could set); the backend verifies the signature. A
    malformed entry is logged and skipped: it must not end the subscription."""
    try:
        if json.loads(fields[b"payload"]).get("store_id") != store_id:
            return None
        return to_proto(entry_id, fields)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        log.warning("malformed decision entry skipped", extra={"entry": entry_id.decode(), "error": repr(exc)})
        return None


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """context.abort, which raises to end the RPC (typed here: grpc ships no annotations)."""
    context.abort(code, details)
    raise AssertionError("grpc's ServicerContext.abort returned")


def _enroll_response(result: dict) -> pb.EnrollResponse:
    status = {
        EnrollmentStatus.ENROLLED: pb.EnrollResponse.ENROLLED,
        EnrollmentStatus.DUPLICATE: pb.EnrollResponse.DUPLICATE,
    }.get(result["status"], pb.EnrollResponse.REJECTED)
    images = [
        pb.ImageVerdict(
            index=i["index"],
            accepted=i["accepted"],
            reason=reason_value(i["reason"]) if i["reason"] else pb.REASON_UNSPECIFIED,
            detail=i["reason"],
        )
        for i in result["images"]
    ]
    return pb.EnrollResponse(
        user_id=result["user_id"],
        status=status,
        images=images,
        model_id=result["model_id"],
        duplicate_of=result["duplicate_of"],
        duplicate_score=result["duplicate_score"],
    )


class GatewayServer:
    """The gateway's gRPC server and, when configured, its health-only server."""

    def __init__(
        self,
        main: grpc.Server,
        health_only: grpc.Server | None,
        guard: Guard,
        health: health.HealthServicer,
        settings: Settings,
    ) -> None:
        self.main, self.health_only, self.guard = main, health_only, guard
        self.health, self.settings = health, settings

    def drain(self) -> threading.Event:
        """What SIGTERM does: health answers NOT_SERVING at once (on both servers: they share the
        servicer), so the load balancer takes this replica out; calls, new ones too, are served
        for grpc_drain_s meanwhile; then new calls are refused and those in progress get
        grpc_stop_grace_s to finish. Returns an event set once the server has stopped."""
        for service in SERVING_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info(
            "gateway draining",
            extra={"drain_s": self.settings.grpc_drain_s, "grace_s": self.settings.grpc_stop_grace_s},
        )
        stopped = threading.Event()

        def stop_after_drain() -> None:
            time.sleep(self.settings.grpc_drain_s)  # serving on: endpoints take a while to forget us
            self.stop(self.settings.grpc_stop_grace_s).wait()
            log.info("gateway stopped")
            stopped.set()

        threading.Thread(target=stop_after_drain, name="gateway-drain", daemon=True).start()
        return stopped

    def stop(self, grace: float | None) -> threading.Event:
        self.health.enter_graceful_shutdown()
        self.guard.close()
        if self.health_only:
            self.health_only.stop(grace)
        return self.main.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.main.wait_for_termination(timeout)


def serve(settings: Settings, registry: CameraRegistry) -> GatewayServer:
    credentials = server_credentials(settings)
    if credentials is None and not is_loopback(settings.grpc_address) and not settings.grpc_allow_plaintext:
        raise ValueError(
            f"refusing to serve plaintext gRPC on {settings.grpc_address}: tokens and faces would cross the "
            "network in clear. Set FACEPAY_GRPC_TLS_CERT_FILE and FACEPAY_GRPC_TLS_KEY_FILE, or "
            "FACEPAY_GRPC_ALLOW_PLAINTEXT=1 when TLS is terminated in front of the gateway"
        )
    # A camera stream, a subscription or an enrollment holds a thread while it lasts. The guard
    # admits calls into shares of gateway_threads (RESOURCE_EXHAUSTED at once beyond them); the
    # pool also holds the health checks' reserve and threads that answer refused calls.
    threads = settings.gateway_threads + settings.grpc_health_reserved_calls + REFUSAL_THREADS
    guard = Guard(settings, registry)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway"),
        interceptors=[guard],
        options=[("grpc.max_receive_message_length", max_message_bytes(settings)), *_connection_age_options(settings)],
    )
    rpc.add_FaceGatewayServicer_to_server(Gateway(settings, registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in (*SERVING_SERVICES, LIVENESS_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    names = (pb.DESCRIPTOR.services_by_name["FaceGateway"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    _listen(server, settings.grpc_address, credentials)
    health_only = _health_only_server(settings, health_servicer) if settings.grpc_health_address else None
    server.start()
    log.info(
        "gateway listening",
        extra={
            "address": settings.grpc_address,
            "tls": credentials is not None,
            "health_address": settings.grpc_health_address,
        },
    )
    return GatewayServer(server, health_only, guard, health_servicer, settings)


def _connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """Retire connections after grpc_max_connection_age_s (GOAWAY; clients reconnect, through the
    load balancer, to any replica): an HTTP/2 connection carries every call of a camera for as
    long as it lives, so without this a scale-up never gets the cameras already connected."""
    if not settings.grpc_max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grpc_stop_grace_s * 1000)),
    ]


def _listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")


def _health_only_server(settings: Settings, servicer: health.HealthServicer) -> grpc.Server:
    """Health alone, plaintext, on its own small pool: Kubernetes' gRPC probe speaks no TLS, and
    a health answer carries no secret. Watch streams are refused here (one-shot probes)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        maximum_concurrent_rpcs=8,
        interceptors=[HealthCheckOnly()],
        options=[("grpc.max_receive_message_length", 4096)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    _listen(server, settings.grpc_health_address, None)
    server.start()
    return server
