"""Issue 9, Critical 2(b): nothing a Redis writer forges or replays is believed.

The attacker here can read and write every key of the pipeline's Redis (the gallery's kept chips
included) but holds no component's private key. Each attack is first shown end to end on the
running pipeline (real Valkey, gateway, workers, models): forged stage messages must not mint
an approval, forged admin commands must not delete, store or unlock anything. The chain and
replay rules are then checked on the real recognizer and detector stages.
"""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest
import redis

from facepay.admin import call
from facepay.config import SessionPolicy
from facepay.contract import pb
from facepay.messages import FIELD, AdminMsg, FrameRef, PosedMsg, SessionEndMsg
from services.recognizer.limits import FailureLimiter
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    running = start_pipeline(tmp_path_factory.mktemp("sec"), SessionPolicy(require_blink=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def victim(pipeline, faces) -> str:
    name, paths = next((n, p) for n, p in faces.identities().items() if len(p) >= 2)
    assert enroll(pipeline, name, [paths[0].read_bytes()]).status == pb.EnrollResponse.ENROLLED
    return name


def client_of(pipeline) -> redis.Redis:
    return redis.Redis.from_url(pipeline.settings.redis_url)


def dead_lettered(pipeline, entry_ids: list[bytes], reason: bytes = b"unauthenticated") -> bool:
    dead = client_of(pipeline).xrange(pipeline.settings.key("dead"))
    return set(entry_ids) <= {f.get(b"entry") for _, f in dead if f.get(b"reason") == reason}


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def forged_session(pipeline, victim: str, session: str) -> list[bytes]:
    """Five PosedMsg entries with the victim's kept enrollment chips and a made-up blink, plus a
    SessionEnd, XADDed straight to `{ns}:posed` as any Redis writer could."""
    client = client_of(pipeline)
    kept = msgpack.unpackb(client.get(pipeline.settings.key("faces", victim)))
    chips = kept["chips"][0]
    now = int(time.time() * 1000)
    ref = dict(session_id=session, store_id="store-1", camera_id="cam-1", captured_ms=now, tenant_id="demo",
               received_ms=now)
    ears = [(0.3, 0.3), (0.3, 0.3), (0.1, 0.1), (0.3, 0.3), (0.3, 0.3)]
    messages = [PosedMsg(ref=FrameRef(sequence=i, **ref), chips=chips, ear=ear, eligible=True,
                         models={"detector": "mtcnn"}, sharpness=100.0, face_px=200.0) for i, ear in enumerate(ears)]
    messages.append(SessionEndMsg(ref=FrameRef(sequence=-1, **ref), frame_count=len(ears)))
    return [client.xadd(pipeline.settings.key("posed"), {FIELD: m.encode()}) for m in messages]


def test_forged_stage_messages_with_a_victims_chips_do_not_mint_an_approval(pipeline, victim):
    backend = Backend(pipeline, "store-1")
    session = new_session()
    forged = forged_session(pipeline, victim, session)
    try:
        wait_until(lambda: dead_lettered(pipeline, forged) or session in {e.session_id for e in backend.events}, 120)
        decided = backend.events
        assert not [e for e in decided if e.session_id == session and e.decision == pb.APPROVE], \
            f"a Redis writer minted an approval for {victim}"
        assert dead_lettered(pipeline, forged), "every forged entry is dead-lettered as unauthenticated"
        assert not client_of(pipeline).exists(pipeline.settings.key("session", f"store-1/{session}")), \
            "a forged entry never reaches the recognizer"
    finally:
        backend.close()


def forged_admin(pipeline, command: str, **args) -> tuple[bytes, str]:
    request_id = uuid.uuid4().hex
    ref = FrameRef(session_id=f"admin-{request_id}", store_id="", camera_id="admin", sequence=0,
                   captured_ms=int(time.time() * 1000))
    message = AdminMsg(ref=ref, command=command, args=args, request_id=request_id)
    return client_of(pipeline).xadd(pipeline.settings.key("posed"), {FIELD: message.encode()}), request_id


def replied(pipeline, request_id: str) -> bool:
    replies = client_of(pipeline).xrange(pipeline.settings.key("admin-replies"))
    return any(f.get(b"request") == request_id.encode() for _, f in replies)


def test_forged_admin_commands_delete_nothing_store_nothing_and_unlock_nothing(pipeline, victim):
    settings = pipeline.settings
    limiter = FailureLimiter(client_of(pipeline), settings)
    client_of(pipeline).set(settings.key("limits", "camera", "cam-locked", "locked"), 100)  # a hard lock
    space = call(settings, "show_user", user_id=victim)["model_id"]
    dim = 128 if space.startswith("dlib") else 1024
    attacks = [forged_admin(pipeline, "delete_user", user_id=victim),
               forged_admin(pipeline, "store_templates", space=space, user_id="mallory", tenant="demo",
                            phone_suffix="", samples=[[1.0] + [0.0] * (dim - 1)]),
               forged_admin(pipeline, "reset_lockout", kind="camera", subject="cam-locked")]
    entries = [entry for entry, _ in attacks]
    wait_until(lambda: dead_lettered(pipeline, entries) or all(replied(pipeline, r) for _, r in attacks), 60)
    assert call(settings, "show_user", user_id=victim)["enrolled"], "a forged delete_user erased the victim"
    assert "mallory" not in call(settings, "list_users", tenant="demo")["users"], "a forged store_templates enrolled"
    assert limiter.locked("cam-locked") == "camera", "a forged reset_lockout unlocked a camera"
    assert dead_lettered(pipeline, entries) and not any(replied(pipeline, r) for _, r in attacks)


def test_a_genuine_session_still_approves_and_genuine_admin_commands_still_work(pipeline, victim, faces):
    backend = Backend(pipeline, "store-1")
    cam = camera(pipeline, "cam-1")
    session = new_session()
    cam.stream_session(session, [faces.identities()[victim][0].read_bytes()] * 3)
    event = backend.wait_for([session], timeout_s=120)[session]
    backend.close()
    cam.close()
    assert (event.decision, event.user_id) == (pb.APPROVE, victim), event.payload
    assert victim in call(pipeline.settings, "list_users", tenant="demo")["users"]
