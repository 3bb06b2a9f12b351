"""Attacks on the gateway (issue 9, items 3, 4, 5, 6 and 13), each against a real gateway on a
real Valkey: what an attacker on the network or holding one camera's token can and cannot do.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from facepay.app.camera import CameraClient
from facepay.app.supervisor import demo_access
from facepay.config import Settings
from facepay.contract import pb, rpc
from facepay.grpc_tls import ClientTLS
from facepay.runtime.embedded import EmbeddedValkey, free_port
from services.gateway.cameras import CameraRegistry
from services.gateway.server import serve
from tests.keysets import signing_as
from tests.test_gateway import png_claiming

CAMERA_METHODS = ("SubmitFrame", "EndSession")


def jpeg(width: int = 64, height: int = 48, noise: bool = False) -> bytes:
    pixels = (
        np.random.default_rng().integers(0, 255, (height, width, 3), np.uint8)
        if noise
        else np.full((height, width, 3), 128, np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("vk")) as server:
        yield server


class Gateway:
    """A real gateway on the shared Valkey, in its own namespace, with the given settings."""

    def __init__(self, valkey: EmbeddedValkey, tls=None, **overrides) -> None:
        self.access = demo_access({"store-1": ["cam-1", "cam-3"], "store-2": ["cam-2"]})
        self.settings = Settings(
            redis_url=valkey.url,
            namespace=f"sg{uuid.uuid4().hex[:6]}",
            grpc_address=f"127.0.0.1:{free_port()}",
            operator_token="op-token",
            **(signing_as("gateway") | overrides),
        )
        self.server = serve(self.settings, CameraRegistry.from_dict(self.access))
        self.tls = tls
        self.redis = redis.Redis.from_url(valkey.url)
        self.channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        channel = (
            self.tls.channel(self.settings.grpc_address)
            if self.tls
            else grpc.insecure_channel(self.settings.grpc_address)
        )
        self.channels.append(channel)
        return channel

    def stub(self) -> rpc.FaceGatewayStub:
        return rpc.FaceGatewayStub(self.channel())

    def creds(self, camera: str) -> tuple:
        return (("x-camera-id", camera), ("authorization", f"Bearer {self.access['cameras'][camera]['token']}"))

    def backend_creds(self, store: str) -> tuple:
        return (("authorization", f"Bearer {self.access['stores'][store]['backend_token']}"),)

    def camera(self, camera: str) -> CameraClient:
        store = self.access["cameras"][camera]["store"]
        return CameraClient(
            self.settings.grpc_address, camera, self.access["cameras"][camera]["token"], store, tls=self.tls
        )

    def submit(self, camera="cam-1", session="s-1", seq=0, image=None, **kw) -> pb.FrameAck:
        store = self.access["cameras"][camera]["store"]
        return self.stub().SubmitFrame(
            pb.Frame(
                camera_id=camera,
                store_id=store,
                session_id=session,
                sequence=seq,
                image=jpeg() if image is None else image,
                **kw,
            ),
            metadata=self.creds(camera),
            timeout=10,
        )

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.server.stop(0)


@pytest.fixture
def gateway_with(valkey):
    started: list[Gateway] = []

    def start(**overrides) -> Gateway:
        started.append(Gateway(valkey, **overrides))
        return started[-1]

    yield start
    for gateway in started:
        gateway.close()


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


class HangingCalls:
    """Calls that send their headers and then never a message (the pre-auth DoS of item 3)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.release = threading.Event()
        self.calls: list[grpc.Future] = []

    def _never(self) -> Iterator[bytes]:
        self.release.wait()
        return
        yield b""

    def open(self, method: str, count: int, metadata: tuple = ()) -> None:
        for _ in range(count):
            multicallable = self.channel.stream_unary(
                f"/facepay.v1.FaceGateway/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            self.calls.append(multicallable.future(self._never(), metadata=metadata))

    def ended(self) -> list[grpc.Future]:
        return [c for c in self.calls if c.done()]

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def hanging():
    opened: list[HangingCalls] = []

    def open_on(channel: grpc.Channel) -> HangingCalls:
        opened.append(HangingCalls(channel))
        return opened[-1]

    yield open_on
    for calls in opened:
        calls.close()


def health_of(gateway: Gateway) -> int:
    return health_pb2_grpc.HealthStub(gateway.channel()).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def backend_is_served(gateway: Gateway, store: str = "store-1") -> bool:
    """A backend's subscription is admitted: its stream stays open (no status within 1 s)."""
    call = gateway.stub().SubscribeDecisions(pb.SubscribeRequest(store_id=store), metadata=gateway.backend_creds(store))
    try:
        return not call.done() and not _ends_within(call, 1.0)
    finally:
        call.cancel()


def _ends_within(call, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if call.done():
            return True
        time.sleep(0.05)
    return False


# ---- item 3: pre-auth denial of service ---------------------------------------------------


@pytest.mark.parametrize("who", ["anonymous", "a stolen camera token"])
def test_130_calls_that_never_send_a_body_do_not_starve_cameras_backends_or_health(gateway_with, hanging, who):
    gateway = gateway_with()
    attacker = hanging(gateway.channel())
    metadata = gateway.creds("cam-1") if who != "anonymous" else (("x-camera-id", "cam-1"),)
    for method in CAMERA_METHODS:
        attacker.open(method, 70, metadata)
    time.sleep(1.0)  # let every hanging call reach the server (nothing to poll: they stay silent)

    assert gateway.submit(camera="cam-2", session="legit").code == 0, "another camera is served"
    assert backend_is_served(gateway, "store-2"), "a payment backend is served"
    assert health_of(gateway) == health_pb2.HealthCheckResponse.SERVING
    refused = [c for c in attacker.ended() if c.exception()]
    assert len(refused) >= 130 - gateway.settings.grpc_max_calls_per_camera, (
        "the attacker's extra calls are refused at once"
    )
    expected = grpc.StatusCode.UNAUTHENTICATED if who == "anonymous" else grpc.StatusCode.RESOURCE_EXHAUSTED
    assert {c.exception().code() for c in refused} == {expected}


def test_long_lived_public_calls_are_capped_per_peer(gateway_with):
    """Health Watch streams need no token and never end: one address gets only its share."""
    gateway = gateway_with(grpc_max_calls_per_peer=3)
    health = health_pb2_grpc.HealthStub(gateway.channel())
    watches = []
    try:
        for _ in range(3):
            watches.append(health.Watch(health_pb2.HealthCheckRequest()))
            assert next(watches[-1]).status == health_pb2.HealthCheckResponse.SERVING
        watches.append(health.Watch(health_pb2.HealthCheckRequest()))
        with pytest.raises(grpc.RpcError) as err:
            next(watches[3])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls from 127.0.0.1" in err.value.details()
        assert health_of(gateway) == health_pb2.HealthCheckResponse.SERVING, "the probe has its own reserve"
    finally:
        for watch in watches:
            watch.cancel()


def test_silent_health_checks_cannot_hold_the_probes_reserve(gateway_with, hanging):
    gateway = gateway_with()
    silent = hanging(gateway.channel())
    for _ in range(gateway.settings.grpc_health_reserved_calls):
        multicallable = silent.channel.stream_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        silent.calls.append(multicallable.future(silent._never()))
    wait_until(lambda: len(silent.ended()) == len(silent.calls), timeout_s=6, what="every silent health check ended")
    assert health_of(gateway) == health_pb2.HealthCheckResponse.SERVING


def test_a_call_that_sends_nothing_is_ended_after_the_idle_timeout(gateway_with, hanging):
    gateway = gateway_with(grpc_idle_timeout_s=1.0)
    silent = hanging(gateway.channel())
    silent.open("SubmitFrame", 2, gateway.creds("cam-1"))
    stream = gateway.stub().StreamFrames(_silent_stream(silent.release), metadata=gateway.creds("cam-3"))
    wait_until(lambda: len(silent.ended()) == 2, what="the silent unary calls ended")
    for call in silent.ended():
        assert call.exception().code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    assert gateway.submit(camera="cam-1").code == 0, "the camera's slots are free again"


def _silent_stream(release: threading.Event) -> Iterator[pb.CameraMessage]:
    release.wait()
    return
    yield pb.CameraMessage()


def test_health_is_answered_when_every_slot_is_taken(gateway_with):
    gateway = gateway_with(gateway_threads=4, grpc_max_calls_per_backend=8)
    subscriptions = [
        gateway.stub().SubscribeDecisions(
            pb.SubscribeRequest(store_id="store-1"), metadata=gateway.backend_creds("store-1")
        )
        for _ in range(4)
    ]
    try:
        time.sleep(1.0)
        assert not any(s.done() for s in subscriptions), "four long-lived subscriptions fill the four slots"
        assert health_of(gateway) == health_pb2.HealthCheckResponse.SERVING, "the liveness probe is never starved"
        error = status_of(lambda: gateway.submit(camera="cam-2"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for subscription in subscriptions:
            subscription.cancel()


def test_a_separate_health_port_answers_plaintext_probes_while_the_gateway_speaks_only_tls(valkey, tmp_path):
    """Kubernetes' gRPC probe speaks no TLS: the health-only port carries no secret."""
    files = _certificates(tmp_path)
    health_address = f"127.0.0.1:{free_port()}"
    gateway = Gateway(
        valkey,
        tls=ClientTLS(ca_file=files["ca.crt"]),
        grpc_tls_cert_file=files["server.crt"],
        grpc_tls_key_file=files["server.key"],
        grpc_health_address=health_address,
        gateway_threads=2,
    )
    subscriptions = [
        gateway.stub().SubscribeDecisions(
            pb.SubscribeRequest(store_id="store-1"), metadata=gateway.backend_creds("store-1")
        )
        for _ in range(2)
    ]
    try:
        probe = health_pb2_grpc.HealthStub(grpc.insecure_channel(health_address))
        assert probe.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        plaintext_gateway = rpc.FaceGatewayStub(grpc.insecure_channel(health_address))
        error = status_of(lambda: plaintext_gateway.SubmitFrame(pb.Frame(), metadata=gateway.creds("cam-1"), timeout=5))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, "only health on that port"
    finally:
        for subscription in subscriptions:
            subscription.cancel()
        gateway.close()


def test_a_message_larger_than_the_image_limit_is_refused_before_it_is_handled(gateway_with):
    gateway = gateway_with(max_image_bytes=256 << 10)
    huge = jpeg(noise=True, width=1200, height=900)
    assert len(huge) > 300 << 10
    error = status_of(lambda: gateway.submit(image=huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    anonymous = status_of(lambda: gateway.stub().SubmitFrame(pb.Frame(image=huge), timeout=10))
    assert anonymous.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)


# ---- item 5: TLS ----------------------------------------------------------------------------


def _certificates(tmp_path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a camera's client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, key, issuer_name, issuer_key, ca: bool, usage=None, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, cert, key) -> None:
        (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facepay test CA")])
    ca = issue("facepay test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, camera_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = issue(
        "gateway",
        server_key,
        ca_name,
        ca_key,
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    camera = issue("cam-1", camera_key, ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    write("ca", ca, ca_key)
    write("server", server, server_key)
    write("cam-1", camera, camera_key)
    return {name: str(tmp_path / name) for name in ("ca.crt", "server.crt", "server.key", "cam-1.crt", "cam-1.key")}


def test_over_tls_cameras_are_served_and_plaintext_is_refused(valkey, tmp_path):
    files = _certificates(tmp_path)
    tls = ClientTLS(ca_file=files["ca.crt"])
    gateway = Gateway(valkey, tls=tls, grpc_tls_cert_file=files["server.crt"], grpc_tls_key_file=files["server.key"])
    try:
        camera = gateway.camera("cam-1")
        acks = camera.stream_session(f"tls-{uuid.uuid4().hex[:6]}", [jpeg()] * 2)
        camera.close()
        assert [a.code for a in acks] == [0, 0, 0]
        assert health_of(gateway) == health_pb2.HealthCheckResponse.SERVING
        plaintext = rpc.FaceGatewayStub(grpc.insecure_channel(gateway.settings.grpc_address))
        error = status_of(lambda: plaintext.SubmitFrame(pb.Frame(), metadata=gateway.creds("cam-1"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.close()


def test_required_client_certificates_keep_out_a_caller_without_one(valkey, tmp_path):
    files = _certificates(tmp_path)
    gateway = Gateway(
        valkey,
        tls=ClientTLS(ca_file=files["ca.crt"], cert_file=files["cam-1.crt"], key_file=files["cam-1.key"]),
        grpc_tls_cert_file=files["server.crt"],
        grpc_tls_key_file=files["server.key"],
        grpc_tls_client_ca_file=files["ca.crt"],
        grpc_tls_require_client_cert=True,
    )
    try:
        assert gateway.submit(camera="cam-1").code == 0, "a camera with its certificate is served"
        no_cert = rpc.FaceGatewayStub(ClientTLS(ca_file=files["ca.crt"]).channel(gateway.settings.grpc_address))
        error = status_of(lambda: no_cert.SubmitFrame(pb.Frame(), metadata=gateway.creds("cam-1"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        wrong_camera = status_of(lambda: gateway.submit(camera="cam-3"))
        assert wrong_camera.code() == grpc.StatusCode.PERMISSION_DENIED, "cam-1's certificate cannot speak for cam-3"
    finally:
        gateway.close()


def test_a_network_address_without_tls_is_refused_unless_plaintext_is_allowed(valkey):
    access = demo_access({"store-1": ["cam-1"]})
    settings = Settings(redis_url=valkey.url, grpc_address=f"0.0.0.0:{free_port()}", **signing_as("gateway"))
    with pytest.raises(ValueError, match="FACEPAY_GRPC_ALLOW_PLAINTEXT"):
        serve(settings, CameraRegistry.from_dict(access))
    server = serve(settings.replace(grpc_allow_plaintext=True), CameraRegistry.from_dict(access))
    server.stop(0)


# ---- item 6: per-camera rate and back-pressure from the queue ------------------------------


def test_a_camera_over_its_frame_rate_is_refused_and_the_client_backs_off(gateway_with):
    gateway = gateway_with(camera_max_fps=4.0, camera_burst=3)
    codes = [_code(lambda i=i: gateway.submit(session="flood", seq=i)) for i in range(8)]
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:], codes
    assert gateway.submit(camera="cam-2", session="other").code == 0, "another camera has its own budget"
    camera = gateway.camera("cam-1")
    acks = camera.stream_session(f"paced-{uuid.uuid4().hex[:6]}", [jpeg()] * 6)
    camera.close()
    assert [a.code for a in acks] == [0] * 7, "the client waited and retried until every frame was queued"


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "rate" in err.details(), err.details()
        return err.code()


def test_frames_are_refused_while_the_detector_lags_too_far_behind(gateway_with):
    gateway = gateway_with(queue_max_lag=5)
    gateway.redis.xgroup_create(gateway.settings.key("frames"), "detector", id="0", mkstream=True)
    seq = iter(range(1000))

    def refused() -> grpc.RpcError | None:
        try:
            gateway.submit(session="lagging", seq=next(seq))
        except grpc.RpcError as err:
            return err
        return None

    error = wait_until(refused, what="a refusal for lag")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "lag" in error.details()
    queued = gateway.redis.xlen(gateway.settings.key("frames"))
    assert all(refused() for _ in range(5)), "no frame is taken while the lag stays above the bound"
    assert gateway.redis.xlen(gateway.settings.key("frames")) == queued


def test_frames_are_refused_before_redis_memory_runs_out(gateway_with):
    gateway = gateway_with(queue_max_memory_ratio=0.8)
    used = gateway.redis.info("memory")["used_memory"]
    gateway.redis.config_set("maxmemory", used + (4 << 20))
    try:
        error = wait_until(
            lambda: _refusal(lambda: gateway.submit(session="big", seq=0, image=jpeg(320, 240, noise=True))),
            what="a refusal for memory",
            timeout_s=30,
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory" in error.details(), error.details()
    finally:
        gateway.redis.config_set("maxmemory", 0)
        gateway.redis.delete(gateway.settings.key("frames"))


def _refusal(call: Callable[[], object]) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


# ---- item 4 (gateway half): OOM, READONLY, LOADING are back-pressure, never UNKNOWN ---------


def test_redis_out_of_memory_is_resource_exhausted_not_unknown(gateway_with):
    gateway = gateway_with(queue_max_memory_ratio=0.0)  # our own guard off: Redis itself refuses
    used = gateway.redis.info("memory")["used_memory"]
    gateway.redis.config_set("maxmemory-policy", "noeviction")
    gateway.redis.config_set("maxmemory", used + (2 << 20))
    try:
        error = wait_until(
            lambda: _refusal(lambda: gateway.submit(session="oom", seq=0, image=jpeg(320, 240, noise=True))),
            what="a refusal once Redis is full",
            timeout_s=30,
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    finally:
        gateway.redis.config_set("maxmemory", 0)
        gateway.redis.delete(gateway.settings.key("frames"))
    assert gateway.submit(session="oom", seq=1).code == 0


def test_a_read_only_replica_after_failover_is_unavailable_and_the_camera_retries(gateway_with):
    gateway = gateway_with()
    gateway.redis.replicaof("127.0.0.1", free_port())  # as after a failover: this node is now a replica
    try:
        error = status_of(lambda: gateway.submit(session="failover"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        camera = gateway.camera("cam-1")
        promote = threading.Timer(1.5, lambda: gateway.redis.replicaof("NO", "ONE"))
        promote.start()
        acks = camera.stream_session(f"failover-{uuid.uuid4().hex[:6]}", [jpeg()] * 2)
        camera.close()
        assert [a.code for a in acks] == [0, 0, 0], "refused while read-only, accepted once writable again"
    finally:
        gateway.redis.replicaof("NO", "ONE")


# ---- item 13: sessions, fields, the stage-side decoder, metrics, secret files -------------


def test_a_frame_for_a_decided_session_is_refused_with_a_clear_status(gateway_with):
    gateway = gateway_with()
    session = f"pos-{uuid.uuid4().hex[:6]}"
    assert gateway.submit(session=session, seq=0).code == 0
    gateway.redis.set(gateway.settings.key(f"decided:store-1/{session}"), "1")  # what the recognizer writes
    error = status_of(lambda: gateway.submit(session=session, seq=1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already decided" in error.details()
    end = pb.CameraMessage(end=pb.SessionEnd(camera_id="cam-1", store_id="store-1", session_id=session, frame_count=2))
    retry = pb.CameraMessage(
        frame=pb.Frame(camera_id="cam-1", store_id="store-1", session_id=session, sequence=0, image=jpeg())
    )
    acks = list(gateway.stub().StreamFrames(iter([retry, end]), metadata=gateway.creds("cam-1")))
    assert acks[0].code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "already decided" in acks[0].message
    assert acks[1].code == 0, "the end marker after an early decision is the camera's normal last word"
    assert gateway.submit(camera="cam-2", session=session).code == 0, "the same id at another store is another session"


def test_a_session_is_capped_in_frames_and_in_duration(gateway_with):
    gateway = gateway_with(session_max_frames=3)
    for seq in range(3):
        assert gateway.submit(session="capped", seq=seq).code == 0
    error = status_of(lambda: gateway.submit(session="capped", seq=2))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "3 frames" in error.details()
    gateway = gateway_with(session_max_duration_s=1.0)
    assert gateway.submit(session="slow", seq=0).code == 0
    error = wait_until(lambda: _refusal(lambda: gateway.submit(session="slow", seq=1)), what="the duration cap")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "longer than" in error.details()


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"phone_suffix": "12ab"}, "phone_suffix"),
        ({"phone_suffix": "1" * 40}, "phone_suffix"),
        ({"seq": 10**12}, "sequence"),
    ],
)
def test_frame_fields_are_validated(gateway_with, fields, why):
    gateway = gateway_with()
    error = status_of(lambda: gateway.submit(session="fields", **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and why in error.details()


def test_an_absurd_frame_count_is_invalid(gateway_with):
    gateway = gateway_with()
    end = pb.SessionEnd(camera_id="cam-1", store_id="store-1", session_id="count", frame_count=10**9)
    error = status_of(lambda: gateway.stub().EndSession(end, metadata=gateway.creds("cam-1")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "frame_count" in error.details()


def test_the_detector_refuses_a_decompression_bomb_that_bypassed_the_gateway():
    from facepay.messages import FrameMsg, FrameRef
    from services.detector.stage import DetectorStage

    stage = DetectorStage(Settings(device="cpu"))
    stage.start()
    bomb = png_claiming(60_000, 60_000)  # 3.6 gigapixels declared in a few bytes
    ref = FrameRef(session_id="bomb", store_id="store-1", camera_id="cam-1", sequence=0, captured_ms=0)
    [out] = stage.handle([FrameMsg(ref=ref, image=bomb)])
    assert out.reason == "unreadable_image" and "outside 16x16" in out.detail


def test_metrics_listen_on_loopback_unless_told_otherwise():
    from facepay.config import load_settings
    from facepay.runtime.metrics import serve_metrics

    settings = load_settings({"FACEPAY_METRICS_PORT": str(free_port())})
    assert settings.metrics_address == "127.0.0.1"
    server = serve_metrics(settings.metrics_port, settings.metrics_address)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()


def test_the_supervisor_writes_its_secret_files_readable_by_their_owner_only(tmp_path):
    from facepay.app.supervisor import Pipeline

    pipeline = Pipeline(Settings(), tmp_path, demo_access({"store-1": ["cam-1"]}))
    for secret in (pipeline.settings.cameras_file, pipeline.settings.grpc_tls_key_file):
        mode = stat.S_IMODE(os.stat(secret).st_mode)
        assert mode == 0o600, (secret, oct(mode))
