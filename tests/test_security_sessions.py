"""Attack: one unreadable session state stopped every timeout decision (issue 9, item 9).

The recognizer's timeout sweep ended at the first session it could not read, so one corrupt
hash in Redis left every other open session of the namespace without a decision. Each session
is now handled on its own: the unreadable one is declined (signed, reason `unreadable_state`)
and moved aside; the others are decided as usual. Real Valkey, the real recognizer stage and
the real runtime.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import msgpack
import pytest
import redis

from facepay.config import SessionPolicy, Settings
from facepay.messages import FIELD, DecisionMsg, FrameRef, decode
from facepay.runtime.embedded import EmbeddedValkey
from facepay.runtime.worker import StreamWorker
from facepay.signing import verify
from facepay.vocabulary import EnrollmentStatus, Purpose, Reason
from services.recognizer.policy import FrameResult
from services.recognizer.stage import RecognizerStage
from services.recognizer.state import SessionStore, UnreadableState
from tests.keysets import signing_as

SIGNING_KEY = "11" * 32


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def recognizer(valkey, tmp_path):
    settings = Settings(
        redis_url=valkey.url,
        namespace=f"t{uuid.uuid4().hex[:8]}",
        signing_key=SIGNING_KEY,
        gallery_url=f"edge://{tmp_path}/gallery",
        policy=SessionPolicy(session_timeout_s=0.2),
        **signing_as("recognizer"),
    )
    stage = RecognizerStage(settings)
    stage.start()
    yield settings, StreamWorker(stage, settings, consumer="r1")
    stage.stop()


def open_session(settings: Settings, session_id: str) -> str:
    """A payment session whose frames stopped coming (no face in either frame)."""
    store = SessionStore(redis.Redis.from_url(settings.redis_url), settings)
    for seq in range(2):
        ref = FrameRef(session_id, "store-1", "cam-1", seq, 0)
        store.record(ref, result=FrameResult(seq, reason="no_face"))
    return f"store-1/{session_id}"


def decisions(client: redis.Redis, settings: Settings) -> dict[str, dict]:
    events = [
        verify(f[b"payload"], f[b"sig"].decode(), f[b"kid"].decode(), {"k1": SIGNING_KEY})
        for _, f in client.xrange(settings.key("decisions"))
    ]
    return {e["session_id"]: e for e in events}


def run_until(worker: StreamWorker, condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        worker.run_once()


def test_an_unreadable_session_is_declined_and_moved_aside_and_the_others_time_out(recognizer):
    settings, worker = recognizer
    client = redis.Redis.from_url(settings.redis_url)
    corrupt = open_session(settings, "s-corrupt")
    healthy = [open_session(settings, f"s-{i}") for i in range(3)]
    client.hset(settings.key("session", corrupt), "f:1", b"\xc1 not msgpack")
    # The corrupt session is the first the sweep meets.
    client.zadd(settings.key("sessions", "open"), {corrupt: 1})

    run_until(worker, lambda: len(decisions(client, settings)) == 4)
    decided = decisions(client, settings)
    assert {s: decided[s.split("/")[1]]["reasons"] for s in healthy} == {s: ["no_face"] for s in healthy}
    bad = decided["s-corrupt"]
    assert bad["decision"] == "decline" and bad["reasons"] == ["unreadable_state"] and bad["store_id"] == "store-1"

    aside = settings.key("quarantine", "session", corrupt)
    run_until(worker, lambda: client.exists(aside) == 1)
    assert client.hget(aside, "f:1") == b"\xc1 not msgpack", "kept as it was, for an operator to inspect"
    assert not client.exists(settings.key("session", corrupt))
    run_until(worker, lambda: client.zcard(settings.key("sessions", "open")) == 0)
    assert 0 < client.ttl(aside) <= 7 * 24 * 3600


def test_a_decided_sessions_state_is_erased_once_the_decision_is_written(recognizer):
    settings, worker = recognizer
    client = redis.Redis.from_url(settings.redis_url)
    key = open_session(settings, "s-erased")
    run_until(worker, lambda: "s-erased" in decisions(client, settings))
    run_until(worker, lambda: not client.exists(settings.key("session", key)))
    assert json.loads(client.xrange(settings.key("decisions"))[0][1][b"payload"])["session_id"] == "s-erased"


def test_an_unreadable_enrollment_is_rejected_with_its_session_id_so_the_gateway_can_answer(recognizer):
    """The gateway matches an enrollment's result to its request by the session id inside the
    signed body; a result without it is never matched and the operator waits for the deadline."""
    settings, worker = recognizer
    client = redis.Redis.from_url(settings.redis_url)
    store = SessionStore(client, settings)
    ref = FrameRef("enroll-s1", "", "enroll", 0, 0, purpose=Purpose.ENROLL, user_id="alice", tenant_id="acme")
    store.record(ref, result=FrameResult(0, reason=Reason.NO_FACE))
    client.hset(settings.key("session", "/enroll-s1"), "f:0", b"\xc1 not msgpack")

    run_until(worker, lambda: client.xlen(settings.key("enrollments")) == 1)
    ((_, fields),) = client.xrange(settings.key("enrollments"))
    result = msgpack.unpackb(fields[b"m"])
    assert result["session_id"] == "enroll-s1"
    assert (result["user_id"], result["status"]) == ("alice", EnrollmentStatus.REJECTED)


def test_each_frames_runner_up_reaches_the_archiver_and_a_state_an_older_recognizer_wrote_still_loads(recognizer):
    """Recognizer replicas share the session state, and it outlives an upgrade: a frame result
    written by an older recognizer (the runner-up's score, not who it was) is read, not declined
    as unreadable. The decision's entry for the archiver names each frame's runner-up when the
    search returned one (audit: whom the payer was told apart from)."""
    settings, worker = recognizer
    client = redis.Redis.from_url(settings.redis_url)
    store = SessionStore(client, settings)
    current = FrameResult(0, top_user="alice", top_score=0.9, second_user="bob", second_score=0.4, ear=0.3)
    store.record(FrameRef("s-runner-up", "store-1", "cam-1", 0, 0), result=current)
    older = dataclasses.asdict(FrameResult(1, top_user="alice", top_score=0.9, second_score=0.4, ear=0.3))
    del older["second_user"]
    client.hset(settings.key("session", "store-1/s-runner-up"), "f:1", msgpack.packb(older))

    run_until(worker, lambda: "s-runner-up" in decisions(client, settings))
    assert decisions(client, settings)["s-runner-up"]["reasons"] != [Reason.UNREADABLE_STATE]
    (entry,) = [
        decode(f[FIELD])
        for _, f in client.xrange(settings.key("decisions"))
        if json.loads(f[b"payload"])["session_id"] == "s-runner-up"
    ]
    assert isinstance(entry, DecisionMsg)
    assert [(f["top_user"], f["second_user"], f["second_score"]) for f in entry.frames] == [
        ("alice", "bob", 0.4),
        ("alice", "", 0.4),
    ]


def test_a_state_a_newer_recognizer_wrote_loads_without_the_fields_this_one_does_not_know(valkey):
    """A rolling upgrade runs old and new recognizer replicas side by side on the same session
    state: a frame result with a field added by a newer version is read by an older one (which
    decides as it always did), not declined as unreadable for every session in flight."""
    settings = Settings(redis_url=valkey.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(settings.redis_url)
    store = SessionStore(client, settings)
    store.record(FrameRef("s-newer", "store-1", "cam-1", 0, 0), result=FrameResult(0, top_user="alice", top_score=0.9))
    newer = dataclasses.asdict(FrameResult(1, top_user="alice", top_score=0.95)) | {"gaze_on_screen": 0.8}
    client.hset(settings.key("session", "store-1/s-newer"), "f:1", msgpack.packb(newer))

    state = store.load("store-1/s-newer")
    assert state is not None
    assert sorted((r.sequence, r.top_user, r.top_score) for r in state.results) == [
        (0, "alice", 0.9),
        (1, "alice", 0.95),
    ]


def test_a_frame_result_without_the_fields_every_version_wrote_is_unreadable(valkey):
    settings = Settings(redis_url=valkey.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(settings.redis_url)
    store = SessionStore(client, settings)
    store.record(FrameRef("s-torn", "store-1", "cam-1", 0, 0), result=FrameResult(0, top_user="alice", top_score=0.9))
    client.hset(settings.key("session", "store-1/s-torn"), "f:1", msgpack.packb({"top_user": "alice"}))
    with pytest.raises(UnreadableState):
        store.load("store-1/s-torn")
