"""The gateway, as cameras meet it: bad input gets a clear gRPC status and nothing else is lost."""

from __future__ import annotations

import io
import struct
import threading
import uuid
import zlib

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from facepay import keys
from facepay.app.supervisor import demo_access
from facepay.config import Settings
from facepay.contract import pb, rpc
from facepay.messages import FIELD, decode
from facepay.runtime.embedded import EmbeddedValkey, free_port
from services.gateway.cameras import CameraRegistry
from services.gateway.server import serve
from tests.e2e import wait_until


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares an absurd size (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    access = demo_access({"store-1": ["cam-1"], "store-2": ["cam-2"]})
    key_dir = tmp_path_factory.mktemp("keys")
    keys.generate(key_dir)
    with EmbeddedValkey(tmp_path_factory.mktemp("vk")) as valkey:
        settings = Settings(
            redis_url=valkey.url,
            namespace=f"gw{uuid.uuid4().hex[:6]}",
            grpc_address=f"127.0.0.1:{free_port()}",
            key_file=str(key_dir / "gateway.key"),
            trusted_keys_file=str(key_dir / "trusted.yaml"),
        )
        server = serve(settings, CameraRegistry.from_dict(access))
        yield settings, access, valkey
        server.stop(0)


def stub_for(settings):
    return rpc.FaceGatewayStub(grpc.insecure_channel(settings.grpc_address))


def creds(access, camera: str, token: str | None = None):
    return (("x-camera-id", camera), ("authorization", f"Bearer {token or access['cameras'][camera]['token']}"))


def frame(store="store-1", camera="cam-1", session="s-1", seq=0, image=None, **kw) -> pb.Frame:
    return pb.Frame(
        camera_id=camera,
        store_id=store,
        session_id=session,
        sequence=seq,
        image=jpeg() if image is None else image,
        **kw,
    )


def queued(settings) -> list:
    client = redis.Redis.from_url(settings.redis_url)
    return [decode(f[FIELD]) for _, f in client.xrange(settings.key("frames"))]


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.mark.parametrize(
    "image, declared, why",
    [
        (b"\xff\xd8\xff\xe0 this is not really a jpeg", {}, "corrupt"),
        (b"", {}, "empty"),
        (png_claiming(100_000, 100_000), {}, "outside"),
        (None, {"width": 100_000, "height": 3}, "declared size"),
        (b"GIF89a" + b"\x00" * 64, {}, "corrupt"),
    ],
)
def test_bad_images_are_invalid_argument_with_a_reason(gateway, image, declared, why):
    settings, access, _ = gateway
    stub = stub_for(settings)
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitFrame(frame(image=image, **declared), metadata=creds(access, "cam-1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in err.value.details()


def test_unknown_camera_and_wrong_token_are_unauthenticated(gateway):
    settings, access, _ = gateway
    stub = stub_for(settings)
    assert (
        status_of(lambda: stub.SubmitFrame(frame(), metadata=creds(access, "cam-1", "wrong")))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        status_of(lambda: stub.SubmitFrame(frame(), metadata=(("x-camera-id", "cam-9"),)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_a_camera_cannot_submit_for_another_store(gateway):
    settings, access, _ = gateway
    stub = stub_for(settings)
    code = status_of(lambda: stub.SubmitFrame(frame(store="store-2"), metadata=creds(access, "cam-1")))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_bad_frame_in_a_stream_gets_its_own_ack_and_the_stream_goes_on(gateway):
    settings, access, _ = gateway
    session = f"s-{uuid.uuid4().hex[:6]}"
    messages = [
        pb.CameraMessage(frame=frame(session=session, seq=0)),
        pb.CameraMessage(frame=frame(session=session, seq=1, image=b"garbage")),
        pb.CameraMessage(frame=frame(session=session, seq=2, store="store-2")),
        pb.CameraMessage(frame=frame(session=session, seq=3)),
        pb.CameraMessage(end=pb.SessionEnd(camera_id="cam-1", store_id="store-1", session_id=session, frame_count=4)),
    ]
    acks = list(stub_for(settings).StreamFrames(iter(messages), metadata=creds(access, "cam-1")))
    assert [a.code for a in acks] == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        0,
        0,
    ]
    mine = [m for m in queued(settings) if m.ref.session_id == session]
    assert [m.ref.sequence for m in mine] == [0, 3, -1], "only the good frames and the end marker are queued"


def test_other_cameras_are_served_while_one_sends_garbage(gateway):
    settings, access, _ = gateway
    stub = stub_for(settings)
    for _ in range(3):
        status_of(lambda: stub.SubmitFrame(frame(image=b"junk"), metadata=creds(access, "cam-1")))
    ack = stub.SubmitFrame(frame(store="store-2", camera="cam-2", session="other"), metadata=creds(access, "cam-2"))
    assert ack.code == 0 and ack.entry_id


def test_an_acknowledged_frame_survives_a_server_crash(gateway):
    settings, access, valkey = gateway
    ack = stub_for(settings).SubmitFrame(frame(session="durable"), metadata=creds(access, "cam-1"))
    valkey.kill()
    valkey.start()
    assert any(m.ref.session_id == "durable" for m in queued(settings))
    assert ack.entry_id in [
        e.decode() for e, _ in redis.Redis.from_url(settings.redis_url).xrange(settings.key("frames"))
    ]


def test_with_the_server_down_frames_are_refused_unavailable_then_accepted_again(gateway):
    settings, access, valkey = gateway
    stub = stub_for(settings)
    valkey.kill()
    try:
        code = status_of(lambda: stub.SubmitFrame(frame(session="outage"), metadata=creds(access, "cam-1")))
        assert code == grpc.StatusCode.UNAVAILABLE, "the camera keeps the frame and retries"
    finally:
        valkey.start()
    assert stub.SubmitFrame(frame(session="outage"), metadata=creds(access, "cam-1")).code == 0


def test_health_and_reflection_are_served(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    settings, _, _ = gateway
    channel = grpc.insecure_channel(settings.grpc_address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="facepay.v1.FaceGateway"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = next(
        reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    assert "facepay.v1.FaceGateway" in [s.name for s in reply.list_services_response.service]


def test_a_camera_without_a_token_is_a_configuration_error():
    with pytest.raises(ValueError, match="no token"):
        CameraRegistry.from_dict({"stores": {"s": {}}, "cameras": {"c": {"store": "s", "token": ""}}})


def test_subscribing_from_a_malformed_entry_id_is_invalid_argument(gateway):
    settings, access, _ = gateway
    token = access["stores"]["store-1"]["backend_token"]
    call = stub_for(settings).SubscribeDecisions(
        pb.SubscribeRequest(store_id="store-1", after_entry_id="yesterday"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert status_of(lambda: next(call)) == grpc.StatusCode.INVALID_ARGUMENT


def test_queued_frames_are_signed_and_their_origin_attested_with_the_image_digest(gateway):
    """Issue 9, 2(b): the stages believe only what the gateway signed (facepay/runtime/envelope.py)."""
    import hashlib

    from facepay.runtime.envelope import open_entry, origin_problem

    settings, access, _ = gateway
    image = jpeg(80, 60)
    ack = stub_for(settings).SubmitFrame(frame(session="s-signed", image=image), metadata=creds(access, "cam-1"))
    ((_, fields),) = redis.Redis.from_url(settings.redis_url).xrange(
        settings.key("frames"), min=ack.entry_id, max=ack.entry_id
    )
    trusted = keys.load_trusted(settings.trusted_keys_file)
    signer, body = open_entry(fields, settings.key("frames"), trusted, {"gateway"})
    message = decode(body)
    assert signer == "gateway" and message.ref.image_sha256 == hashlib.sha256(image).hexdigest()
    assert origin_problem(message.ref, trusted) == ""


# ---- Kubernetes: drain on SIGTERM, connections retired after a maximum age (issue 13) ---------
def health_at(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def refused_as_unavailable(settings, access) -> bool:
    """A new call, on a new connection, is refused."""
    with grpc.insecure_channel(settings.grpc_address) as channel:
        try:
            rpc.FaceGatewayStub(channel).SubmitFrame(
                frame(session=f"n-{uuid.uuid4().hex[:6]}"), metadata=creds(access, "cam-1"), timeout=2
            )
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return False


def gateway_for_deploy(gateway, **overrides):
    settings, access, _ = gateway
    settings = settings.replace(
        namespace=f"gw{uuid.uuid4().hex[:6]}",
        grpc_address=f"127.0.0.1:{free_port()}",
        grpc_health_address=f"127.0.0.1:{free_port()}",
        **overrides,
    )
    return settings, serve(settings, CameraRegistry.from_dict(access))


def test_on_sigterm_health_says_not_serving_at_once_calls_in_flight_finish_and_new_ones_are_refused(gateway):
    _, access, _ = gateway
    settings, server = gateway_for_deploy(gateway, grpc_drain_s=2.0, grpc_stop_grace_s=20.0)
    session, release = f"s-{uuid.uuid4().hex[:6]}", threading.Event()

    def camera_stream():
        yield pb.CameraMessage(frame=frame(session=session, seq=0))
        release.wait(30)
        yield pb.CameraMessage(frame=frame(session=session, seq=1))
        yield pb.CameraMessage(
            end=pb.SessionEnd(camera_id="cam-1", store_id="store-1", session_id=session, frame_count=2)
        )

    channel = grpc.insecure_channel(settings.grpc_address)
    try:
        in_flight = rpc.FaceGatewayStub(channel).StreamFrames(camera_stream(), metadata=creds(access, "cam-1"))
        acks = [next(in_flight)]
        stopped = server.drain()  # what SIGTERM does
        assert health_at(settings.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_at(settings.grpc_health_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_at(settings.grpc_health_address, "liveness") == health_pb2.HealthCheckResponse.SERVING, (
            "a liveness probe does not restart a gateway finishing its calls"
        )
        assert rpc.FaceGatewayStub(channel).SubmitFrame(
            frame(session=f"d-{uuid.uuid4().hex[:6]}"), timeout=5, metadata=creds(access, "cam-1")
        ), "served while draining"
        wait_until(lambda: refused_as_unavailable(settings, access), 20, "new calls refused once the drain is over")
        assert not stopped.is_set(), "the call in flight holds the stop"
        release.set()
        acks += list(in_flight)
        assert [(a.sequence, a.code) for a in acks] == [(0, 0), (1, 0), (-1, 0)], "the stream in flight completed"
        wait_until(stopped.is_set, 20, "stopped once the last call ended")
    finally:
        release.set()
        channel.close()
        server.stop(0)


def test_connections_are_retired_after_their_maximum_age_and_clients_carry_on_over_new_ones(gateway):
    _, access, _ = gateway
    settings, server = gateway_for_deploy(gateway, grpc_max_connection_age_s=1.0, grpc_stop_grace_s=1.0)
    channel = grpc.insecure_channel(settings.grpc_address)
    try:
        stub = rpc.FaceGatewayStub(channel)
        token = access["stores"]["store-1"]["backend_token"]
        subscription = stub.SubscribeDecisions(
            pb.SubscribeRequest(store_id="store-1"), metadata=(("authorization", f"Bearer {token}"),)
        )
        wait_until(subscription.done, 20, "a long-lived stream ended by its connection's age (plus grace)")
        assert subscription.code() == grpc.StatusCode.UNAVAILABLE, "a status the backend resubscribes on"
        assert stub.SubmitFrame(frame(session=f"a-{uuid.uuid4().hex[:6]}"), metadata=creds(access, "cam-1"), timeout=10)
    finally:
        channel.close()
        server.stop(0)
