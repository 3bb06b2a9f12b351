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
from facepay.decisions import consume
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
    as unreadable. The decision record for the archiver names each frame's runner-up when the
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
        m
        for m in (decode(f[FIELD]) for _, f in client.xrange(settings.key("decision-records")))
        if m.ref.session_id == "s-runner-up"
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


# ---- what a payment backend reads --------------------------------------------------------
@pytest.fixture(scope="module")
def acl_valkey(tmp_path_factory):
    """A Valkey with the components' ACL users for namespace `fp`, as production runs it."""
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey-acl"), namespace="fp") as server:
        yield server


def test_a_payment_backend_learns_the_decision_and_never_whom_else_the_face_resembled(acl_valkey, tmp_path):
    """Backends read `{ns}:decisions` in full. For an approved and a declined session they find
    the signed event and nothing else: not each frame's best and runner-up users and their scores,
    nor the session rule. Those go to the archiver on `{ns}:decision-records`, which the recognizer
    writes (under its own ACL user), the archiver reads and a backend may not."""
    settings = Settings(
        redis_url=acl_valkey.url_for("recognizer"),
        namespace="fp",
        signing_key=SIGNING_KEY,
        gallery_url=f"edge://{tmp_path}/gallery",
        policy=SessionPolicy(
            threshold=0.6, margin=0.05, min_agreeing_frames=2, require_blink=False, session_timeout_s=0.2
        ),
        **signing_as("recognizer"),
    )
    stage = RecognizerStage(settings)
    stage.start()
    worker = StreamWorker(stage, settings, consumer="r1")
    try:
        store = SessionStore(redis.Redis.from_url(acl_valkey.url), settings)
        for seq in range(3):  # alice, told apart from bob in every frame
            result = FrameResult(seq, top_user="alice", top_score=0.9, second_user="bob", second_score=0.41, ear=0.3)
            store.record(FrameRef("s-paid", "store-1", "cam-1", seq, 0), result=result)
        for seq in range(3):  # someone who is not enrolled: carol and dave are the nearest, far below
            result = FrameResult(seq, top_user="carol", top_score=0.42, second_user="dave", second_score=0.37, ear=0.3)
            store.record(FrameRef("s-declined", "store-1", "cam-1", seq, 0), result=result)
        backend = redis.Redis.from_url(acl_valkey.url_for("backend"))
        stream = settings.key("decisions")
        run_until(worker, lambda: backend.xlen(stream) == 2)
    finally:
        stage.stop()

    entries = [fields for _, fields in backend.xrange(stream)]
    events = {json.loads(f[b"payload"])["session_id"]: f for f in entries}
    assert set(events) == {"s-paid", "s-declined"}
    paid = verify(events["s-paid"][b"payload"], events["s-paid"][b"sig"].decode(), "k1", {"k1": SIGNING_KEY})
    declined = verify(
        events["s-declined"][b"payload"], events["s-declined"][b"sig"].decode(), "k1", {"k1": SIGNING_KEY}
    )
    assert (paid["decision"], paid["user_id"]) == ("approve", "alice")
    assert (declined["decision"], declined["user_id"]) == ("decline", "")
    for fields in entries:
        assert set(fields) == {b"payload", b"sig", b"kid", b"store"}, "the signed event and its store, nothing else"
        raw = b"".join(fields.values())
        for beside_the_payer in (b"bob", b"carol", b"dave", b"top_user", b"second_score", b"0.41", b"0.37"):
            assert beside_the_payer not in raw
    consumed = consume(backend, stream, "backend-store-1", "b-0", {"k1": SIGNING_KEY}, "store-1", start="0")
    assert {next(consumed)[1]["session_id"] for _ in range(2)} == {"s-paid", "s-declined"}

    records = settings.key("decision-records")
    with pytest.raises(redis.exceptions.NoPermissionError):
        backend.xrange(records)
    with pytest.raises(redis.exceptions.NoPermissionError):
        backend.xread({records: "0"})
    archiver = redis.Redis.from_url(acl_valkey.url_for("archiver"))
    kept = {m.ref.session_id: m for m in (decode(f[FIELD]) for _, f in archiver.xrange(records))}
    assert all(isinstance(m, DecisionMsg) for m in kept.values())
    assert [(f["top_user"], f["second_user"]) for f in kept["s-declined"].frames] == [("carol", "dave")] * 3
    assert kept["s-paid"].payload == events["s-paid"][b"payload"], "the event exactly as the backend got it"
    assert kept["s-paid"].policy["min_agreeing_frames"] == 2


def test_decision_records_are_kept_for_the_archiver_and_no_longer_than_decisions_without_one(recognizer):
    """The records hold names: with no archiver (Pipeline(archive=False), a replay) the recognizer
    trims them as it trims decisions (retention, length bound); an archiver's group that has not
    processed a record holds it back until it has."""
    settings, worker = recognizer
    worker.settings = settings.replace(stream_retention_s=1)
    client = redis.Redis.from_url(settings.redis_url)
    records, events = settings.key("decision-records"), settings.key("decisions")
    open_session(settings, "s-unread")
    run_until(worker, lambda: client.xlen(records) == 1)
    client.xgroup_create(records, "archiver", id="0")  # an archiver that has not read it yet
    open_session(settings, "s-no-archiver-yet")
    run_until(worker, lambda: client.xlen(events) == 2)

    def trimmed(stream: str, left: int):
        return lambda: worker._trim_history() or client.xlen(stream) == left

    run_until(worker, trimmed(events, 0))
    assert client.xlen(records) == 2, "unread by the archiver: kept"
    (((delivered, _),),) = [items for _, items in client.xreadgroup("archiver", "a1", {records: ">"}, count=1)]
    run_until(worker, trimmed(records, 2))
    client.xack(records, "archiver", delivered)
    run_until(worker, trimmed(records, 1))  # processed: gone; the one not yet read stays
