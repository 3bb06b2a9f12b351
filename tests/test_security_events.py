"""Attacks on decision events (issue 9, item 10).

A signed APPROVE is only good for the store it names, for a short while, and once: a replayed
event verified twice, and a store's backend accepted another store's event when the unsigned
`store` stream field said so. One malformed entry in `{ns}:decisions` ended every subscription.
Real Valkey and the real gateway; events signed as the recognizer signs them.
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
import redis

from facepay.app.supervisor import demo_access
from facepay.config import Settings
from facepay.contract import pb, rpc
from facepay.decisions import EventRefused, SeenEvents, consume, to_proto, verify_event
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.signing import sign
from services.gateway.cameras import CameraRegistry
from services.gateway.server import serve
from tests.keysets import signing_as

KEY_ID, KEY = "k1", "22" * 32
KEYS = {KEY_ID: KEY}


def signed_entry(
    store: str,
    session: str,
    *,
    decided_at_ms: int | None = None,
    stream_store: str | None = None,
    decision: str = "approve",
) -> dict[bytes, bytes]:
    """A decision entry as the recognizer writes it; `stream_store` forges the unsigned field."""
    now = int(time.time() * 1000) if decided_at_ms is None else decided_at_ms
    event = {
        "schema": "facepay.decision.v1",
        "event_id": f"fp:{store}/{session}",
        "session_id": session,
        "store_id": store,
        "camera_id": "cam-1",
        "tenant_id": "demo",
        "decision": decision,
        "user_id": "alice" if decision == "approve" else "",
        "score": 0.97,
        "threshold": 0.943,
        "threshold_source": "default",
        "template_space": "t",
        "reasons": ["matched"],
        "rule": "matched",
        "model_ids": {},
        "first_frame_ms": now - 500,
        "decided_at_ms": now,
        "frames_seen": 5,
        "frames_eligible": 5,
    }
    fields = sign(event, KEY, KEY_ID)
    fields[b"store"] = (stream_store or store).encode()
    return fields


def as_proto(fields: dict[bytes, bytes]) -> pb.DecisionEvent:
    return to_proto(b"1-0", fields)


# ---- verify_event: the expected store, a maximum age, once -------------------------------------


def test_a_correctly_signed_event_of_another_store_is_refused():
    event = as_proto(signed_entry("store-2", "s-1"))
    assert verify_event(event, KEYS, store_id="store-2")["user_id"] == "alice"
    with pytest.raises(EventRefused, match="store"):
        verify_event(event, KEYS, store_id="store-1")


def test_an_old_event_is_refused_unless_the_backend_replays_history_on_purpose():
    stale = as_proto(signed_entry("store-1", "s-old", decided_at_ms=int(time.time() * 1000) - 3_600_000))
    with pytest.raises(EventRefused, match="old"):
        verify_event(stale, KEYS, store_id="store-1")
    assert verify_event(stale, KEYS, store_id="store-1", max_age_s=None)["session_id"] == "s-old"


def test_an_event_from_the_future_is_refused():
    ahead = as_proto(signed_entry("store-1", "s-ahead", decided_at_ms=int(time.time() * 1000) + 3_600_000))
    with pytest.raises(EventRefused, match="future"):
        verify_event(ahead, KEYS, store_id="store-1")


def test_a_replayed_event_is_refused_the_second_time():
    event = as_proto(signed_entry("store-1", "s-replay"))
    seen = SeenEvents()
    verify_event(event, KEYS, store_id="store-1", seen=seen)
    with pytest.raises(EventRefused, match="already"):
        verify_event(event, KEYS, store_id="store-1", seen=seen)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


def test_backend_replicas_sharing_redis_refuse_an_event_one_of_them_has_seen(valkey):
    client = redis.Redis.from_url(valkey.url)
    key = f"backend-{uuid.uuid4().hex[:6]}:seen"
    event = as_proto(signed_entry("store-1", "s-twice"))
    verify_event(event, KEYS, store_id="store-1", seen=SeenEvents(client, key))
    with pytest.raises(EventRefused, match="already"):
        verify_event(event, KEYS, store_id="store-1", seen=SeenEvents(client, key))
    assert client.ttl(f"{key}:fp:store-1/s-twice") > 0, "remembered for the age window only"


def test_consume_yields_each_of_its_stores_events_once_and_skips_the_rest(valkey):
    client = redis.Redis.from_url(valkey.url)
    stream = f"c{uuid.uuid4().hex[:6]}:decisions"
    good = signed_entry("store-1", "s-good")
    client.xadd(stream, {b"payload": b"{not json"})  # malformed
    client.xadd(stream, signed_entry("store-2", "s-other", stream_store="store-1"))  # another store's
    client.xadd(stream, good)
    client.xadd(stream, good)  # replayed
    tampered = dict(signed_entry("store-1", "s-tampered"))
    tampered[b"payload"] = tampered[b"payload"].replace(b'"alice"', b'"mallory"')
    client.xadd(stream, tampered)
    client.xadd(stream, signed_entry("store-1", "s-last", decision="decline"))

    got = []
    for entry_id, event in consume(client, stream, "backend", "b1", KEYS, store_id="store-1", start="0", block_ms=100):
        got.append(event["session_id"])
        client.xack(stream, "backend", entry_id)
        if event["session_id"] == "s-last":
            break
    assert got == ["s-good", "s-last"]
    assert client.xpending(stream, "backend")["pending"] == 0, "refused entries are acknowledged, not retried"


# ---- SubscribeDecisions: the signed store, and one bad entry ends nothing ---------------------


@pytest.fixture(scope="module")
def gateway(valkey):
    access = demo_access({"store-1": ["cam-1"], "store-2": ["cam-2"]})
    settings = Settings(
        redis_url=valkey.url,
        namespace=f"ev{uuid.uuid4().hex[:6]}",
        grpc_address=f"127.0.0.1:{free_port()}",
        **signing_as("gateway"),
    )
    server = serve(settings, CameraRegistry.from_dict(access))
    yield settings, access
    server.stop(0)


def subscribe(settings, access, store: str, until_session: str, timeout_s: float = 15.0) -> list[pb.DecisionEvent]:
    """Every event the store's subscription delivers, up to `until_session` (or the timeout)."""
    channel = grpc.insecure_channel(settings.grpc_address)
    token = access["stores"][store]["backend_token"]
    call = rpc.FaceGatewayStub(channel).SubscribeDecisions(
        pb.SubscribeRequest(store_id=store, after_entry_id="0-0"), metadata=(("authorization", f"Bearer {token}"),)
    )
    received: list[pb.DecisionEvent] = []
    timer = threading.Timer(timeout_s, call.cancel)
    timer.start()
    try:
        for event in call:
            received.append(event)
            if event.session_id == until_session:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise
    finally:
        timer.cancel()
        call.cancel()
        channel.close()
    return received


def test_subscriptions_filter_on_the_signed_store_and_survive_a_malformed_entry(gateway):
    settings, access = gateway
    client = redis.Redis.from_url(settings.redis_url)
    stream = settings.key("decisions")
    client.xadd(stream, signed_entry("store-2", "s-of-store-2", stream_store="store-1"))
    client.xadd(stream, signed_entry("store-1", "s-of-store-1", stream_store="store-2"))
    client.xadd(stream, {b"store": b"store-1", b"payload": b"\xff not an event"})
    client.xadd(stream, {b"store": b"store-1"})
    client.xadd(stream, signed_entry("store-1", "s-after-the-bad-ones"))

    got = [e.session_id for e in subscribe(settings, access, "store-1", until_session="s-after-the-bad-ones")]
    assert got == ["s-of-store-1", "s-after-the-bad-ones"]
    got = [e.session_id for e in subscribe(settings, access, "store-2", until_session="s-of-store-2", timeout_s=5)]
    assert got == ["s-of-store-2"]
