"""Issue 9, Critical 2(b): nothing a Redis writer forges or replays is believed.

The attacker here can read and write every key of the pipeline's Redis (the gallery's kept chips
included) but holds no component's private key. Each attack is first shown end to end on the
running pipeline (real Valkey, gateway, workers, models): forged stage messages must not mint
an approval, forged admin commands must not delete, store or unlock anything. The chain and
replay rules are then checked on the real recognizer and detector stages.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import redis

from facepay.app.admin import call
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
    ref = dict(
        session_id=session, store_id="store-1", camera_id="cam-1", captured_ms=now, tenant_id="demo", received_ms=now
    )
    ears = [(0.3, 0.3), (0.3, 0.3), (0.1, 0.1), (0.3, 0.3), (0.3, 0.3)]
    messages = [
        PosedMsg(
            ref=FrameRef(sequence=i, **ref),
            chips=chips,
            ear=ear,
            eligible=True,
            models={"detector": "mtcnn"},
            sharpness=100.0,
            face_px=200.0,
        )
        for i, ear in enumerate(ears)
    ]
    messages.append(SessionEndMsg(ref=FrameRef(sequence=-1, **ref), frame_count=len(ears)))
    return [client.xadd(pipeline.settings.key("posed"), {FIELD: m.encode()}) for m in messages]


def test_forged_stage_messages_with_a_victims_chips_do_not_mint_an_approval(pipeline, victim):
    backend = Backend(pipeline, "store-1")
    session = new_session()
    forged = forged_session(pipeline, victim, session)
    try:
        wait_until(lambda: dead_lettered(pipeline, forged) or session in {e.session_id for e in backend.events}, 120)
        decided = backend.events
        assert not [e for e in decided if e.session_id == session and e.decision == pb.APPROVE], (
            f"a Redis writer minted an approval for {victim}"
        )
        assert dead_lettered(pipeline, forged), "every forged entry is dead-lettered as unauthenticated"
        assert not client_of(pipeline).exists(pipeline.settings.key("session", f"store-1/{session}")), (
            "a forged entry never reaches the recognizer"
        )
    finally:
        backend.close()


def forged_admin(pipeline, command: str, **args) -> tuple[bytes, str]:
    request_id = uuid.uuid4().hex
    ref = FrameRef(
        session_id=f"admin-{request_id}",
        store_id="",
        camera_id="admin",
        sequence=0,
        captured_ms=int(time.time() * 1000),
    )
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
    attacks = [
        forged_admin(pipeline, "delete_user", user_id=victim),
        forged_admin(
            pipeline,
            "store_templates",
            space=space,
            user_id="mallory",
            tenant="demo",
            phone_suffix="",
            samples=[[1.0] + [0.0] * (dim - 1)],
        ),
        forged_admin(pipeline, "reset_lockout", kind="camera", subject="cam-locked"),
    ]
    entries = [entry for entry, _ in attacks]
    wait_until(lambda: dead_lettered(pipeline, entries) or all(replied(pipeline, r) for _, r in attacks), 60)
    assert call(settings, "show_user", user_id=victim)["enrolled"], "a forged delete_user erased the victim"
    assert "mallory" not in call(settings, "list_users", tenant="demo")["users"], "a forged store_templates enrolled"
    assert limiter.locked("cam-locked") == "camera", "a forged reset_lockout unlocked a camera"
    assert dead_lettered(pipeline, entries) and not any(replied(pipeline, r) for _, r in attacks)


@pytest.fixture(scope="module")
def genuine(pipeline, victim, faces) -> tuple[str, pb.DecisionEvent]:
    """A real session of the victim at cam-1, through every stage."""
    backend = Backend(pipeline, "store-1")
    cam = camera(pipeline, "cam-1")
    session = new_session()
    cam.stream_session(session, [faces.identities()[victim][0].read_bytes()] * 3)
    event = backend.wait_for([session], timeout_s=120)[session]
    backend.close()
    cam.close()
    return session, event


def test_a_genuine_session_still_approves_and_genuine_admin_commands_still_work(pipeline, victim, genuine):
    _, event = genuine
    assert (event.decision, event.user_id) == (pb.APPROVE, victim), event.payload
    assert victim in call(pipeline.settings, "list_users", tenant="demo")["users"]


def posed_entries_of(pipeline, session: str) -> list[dict]:
    entries = client_of(pipeline).xrange(pipeline.settings.key("posed"))
    return [f for _, f in entries if f.get(b"k") == b"pose" and session.encode() in f[FIELD]]


def test_a_stage_key_cannot_retarget_a_genuine_frame_or_make_one_up(pipeline, victim, genuine):
    """Even with the pose worker's own key (a compromised stage), a frame's session, store,
    user or purpose cannot change, and a frame the gateway never saw does not count: the
    recognizer checks the gateway's attestation in the ref (the chain)."""
    from facepay.keys import load_signer
    from facepay.messages import decode
    from facepay.runtime.envelope import seal

    pose_key = load_signer(str(pipeline.keys_dir / "pose.key"))
    posed = pipeline.settings.key("posed")
    original = decode(posed_entries_of(pipeline, genuine[0])[0][FIELD])
    session = new_session()
    retargeted = [
        dataclasses.replace(original.ref, session_id=session),
        dataclasses.replace(original.ref, store_id="store-2"),
        dataclasses.replace(original.ref, purpose="enroll", user_id="mallory"),
        dataclasses.replace(original.ref, session_id=session, origin_sig=""),
    ]
    client = client_of(pipeline)
    entries = [
        client.xadd(posed, seal({FIELD: dataclasses.replace(original, ref=ref).encode()}, posed, pose_key))
        for ref in retargeted
    ]
    wait_until(lambda: dead_lettered(pipeline, entries), 60)
    dead = {f[b"entry"]: f[b"error"] for _, f in client.xrange(pipeline.settings.key("dead"))}
    assert all(b"not attested by the gateway" in dead[e] for e in entries)


def test_genuine_entries_replayed_decide_nothing_twice(pipeline, genuine):
    session, _event = genuine
    client = client_of(pipeline)
    posed = pipeline.settings.key("posed")
    replayed = [client.xadd(posed, fields) for fields in posed_entries_of(pipeline, session)]
    assert replayed
    wait_until(
        lambda: client.xpending(posed, "recognizer")["pending"] == 0 and client.xinfo_groups(posed)[0]["lag"] == 0, 60
    )
    decisions = [f for _, f in client.xrange(pipeline.settings.key("decisions")) if session.encode() in f[b"payload"]]
    assert len(decisions) == 1, "the decided key outlives any frame young enough to be accepted"


def signed_operator_command(pipeline, command: str, issued_at_ms: int, request_id: str, **args) -> dict:
    """The stream entry of an admin command, signed with the operator's key."""
    from facepay.keys import load_signer
    from facepay.runtime.envelope import seal

    ref = FrameRef(
        session_id=f"admin-{request_id}", store_id="", camera_id="admin", sequence=0, captured_ms=issued_at_ms
    )
    message = AdminMsg(ref=ref, command=command, args=args, request_id=request_id, issued_at_ms=issued_at_ms)
    posed = pipeline.settings.key("posed")
    return seal({FIELD: message.encode()}, posed, load_signer(pipeline.settings.operator_key_file))


def operator_command(pipeline, command: str, issued_at_ms: int, request_id: str, **args) -> bytes:
    entry = signed_operator_command(pipeline, command, issued_at_ms, request_id, **args)
    return client_of(pipeline).xadd(pipeline.settings.key("posed"), entry)


def test_stale_or_repeated_operator_commands_are_refused(pipeline, victim):
    client = client_of(pipeline)
    hour_ago = int(time.time() * 1000) - 3600_000
    stale = operator_command(pipeline, "delete_user", hour_ago, uuid.uuid4().hex, user_id=victim)
    request_id = uuid.uuid4().hex
    # A Redis reader copies a genuine command before it is carried out (and erased from the stream).
    original = signed_operator_command(pipeline, "list_users", int(time.time() * 1000), request_id, tenant="demo")
    client.xadd(pipeline.settings.key("posed"), original)
    wait_until(lambda: replied(pipeline, request_id), 60)
    repeated = client.xadd(pipeline.settings.key("posed"), original)
    wait_until(lambda: dead_lettered(pipeline, [stale, repeated]), 60)
    assert call(pipeline.settings, "show_user", user_id=victim)["enrolled"]


def test_each_process_holds_only_its_own_private_key(pipeline):
    import os
    import stat

    for name, process in pipeline.processes.items():
        environ = dict(
            line.split("=", 1) for line in Path(f"/proc/{process.pid}/environ").read_text().split("\0") if "=" in line
        )
        component = name if name == "gateway" else name.rsplit("-", 1)[0]
        assert environ["FACEPAY_KEY_FILE"] == str(pipeline.keys_dir / f"{component}.key")
        assert not environ.get("FACEPAY_OPERATOR_KEY_FILE"), f"{name} must not hold the operator's key"
        holds_archive = bool(environ.get("FACEPAY_ARCHIVE_KEYS_FILE") or environ.get("AWS_SECRET_ACCESS_KEY"))
        assert holds_archive == (component == "archiver"), f"{name}: the archive's keys are the archiver's only"
    for key_file in pipeline.keys_dir.glob("*.key"):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


# ---- the chain's rules on the real stages -----------------------------------------------------
@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    from facepay import keys

    folder = tmp_path_factory.mktemp("keys")
    keys.generate(folder)
    return folder


def gateway_ref(keyset, image: bytes | None, received_ms: int | None = None) -> FrameRef:
    from facepay.keys import load_signer
    from facepay.runtime.envelope import attest

    now = int(time.time() * 1000)
    ref = FrameRef(
        session_id="s1",
        store_id="store-1",
        camera_id="cam-1",
        sequence=0,
        captured_ms=now,
        tenant_id="demo",
        received_ms=now if received_ms is None else received_ms,
    )
    return attest(ref, load_signer(str(keyset / "gateway.key")), image)


def test_the_recognizer_refuses_frames_the_gateway_received_longer_ago_than_the_bound(keyset):
    from facepay.config import Settings
    from facepay.keys import load_trusted
    from services.recognizer.stage import RecognizerStage

    trusted = load_trusted(str(keyset / "trusted.yaml"))
    stage = RecognizerStage(Settings(max_frame_age_s=3600))
    fresh = PosedMsg(ref=gateway_ref(keyset, b"img"))
    old = PosedMsg(ref=gateway_ref(keyset, b"img", received_ms=int(time.time() * 1000) - 2 * 3600_000))
    assert stage.refuse(fresh, trusted) == ""
    assert "more than 3600 s ago" in stage.refuse(old, trusted)
    retimed = PosedMsg(ref=dataclasses.replace(old.ref, received_ms=fresh.ref.received_ms))
    assert "not attested" in stage.refuse(retimed, trusted), "the received time is attested too"


def test_the_detector_refuses_an_image_other_than_the_one_the_gateway_attested(keyset):
    from facepay.config import Settings
    from facepay.keys import load_trusted
    from facepay.messages import FrameMsg
    from services.detector.stage import DetectorStage

    trusted = load_trusted(str(keyset / "trusted.yaml"))
    detector = DetectorStage(Settings())
    ref = gateway_ref(keyset, b"the camera's image")
    assert detector.refuse(FrameMsg(ref=ref, image=b"the camera's image"), trusted) == ""
    assert "digest" in detector.refuse(FrameMsg(ref=ref, image=b"another image"), trusted)
    assert "not attested" in detector.refuse(
        FrameMsg(ref=dataclasses.replace(ref, session_id="s2"), image=b"the camera's image"), trusted
    )


def test_facepay_keys_generate_writes_private_keys_0600_and_the_trusted_file(tmp_path):
    import os
    import stat
    import subprocess
    import sys

    import yaml

    from facepay.keys import COMPONENTS

    done = subprocess.run(
        [sys.executable, "-m", "facepay", "keys", "generate", "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert set(yaml.safe_load((tmp_path / "k" / "trusted.yaml").read_text())) == set(COMPONENTS)
    for component in COMPONENTS:
        assert stat.S_IMODE(os.stat(tmp_path / "k" / f"{component}.key").st_mode) == 0o600


@pytest.mark.parametrize("command", [["gateway"], ["worker", "pose"]])
def test_a_process_without_its_key_file_fails_at_start_up_naming_facepay_keys_generate(command, keyset, tmp_path):
    import os
    import subprocess
    import sys

    cameras = tmp_path / "cameras.yaml"
    cameras.write_text("stores: {}\ncameras: {}\n")
    env = {
        **os.environ,
        "FACEPAY_KEY_FILE": "",
        "FACEPAY_TRUSTED_KEYS_FILE": str(keyset / "trusted.yaml"),
        "FACEPAY_CAMERAS_FILE": str(cameras),
        "FACEPAY_GRPC_ADDRESS": "127.0.0.1:0",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "facepay", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "FACEPAY_KEY_FILE is not set" in done.stderr and "facepay keys generate" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_cli_believes_only_replies_the_recognizer_signed(keyset, tmp_path):
    """A Redis writer answering an admin command first (say, "user deleted") is not believed."""
    import threading

    from facepay.app.admin import AdminError
    from facepay.config import Settings
    from facepay.keys import load_signer
    from facepay.runtime.embedded import EmbeddedValkey
    from facepay.runtime.envelope import seal

    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = Settings(
            redis_url=server.url,
            namespace="cli",
            operator_key_file=str(keyset / "operator.key"),
            trusted_keys_file=str(keyset / "trusted.yaml"),
        )
        client = redis.Redis.from_url(server.url)
        pose_key = load_signer(str(keyset / "pose.key"))
        stop = threading.Event()

        def answer_every_command_falsely() -> None:
            cursor = b"0-0"
            while not stop.is_set():
                for _, items in client.xread({settings.key("posed"): cursor}, block=100) or []:
                    for _cursor, _fields in items:
                        request = msgpack.unpackb(_fields[FIELD])["request_id"]
                        lie = msgpack.packb({"ok": True, "request_id": request, "users": ["mallory"]})
                        replies = settings.key("admin-replies")
                        client.xadd(replies, {b"request": request.encode(), FIELD: lie})
                        client.xadd(replies, seal({b"request": request.encode(), FIELD: lie}, replies, pose_key))

        liar = threading.Thread(target=answer_every_command_falsely, daemon=True)
        liar.start()
        try:
            with pytest.raises(AdminError, match="no recognizer answered"):
                call(settings, "list_users", timeout_s=2)
        finally:
            stop.set()
            liar.join()
