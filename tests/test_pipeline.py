"""The whole path on real parts and real photos: camera frames in, signed payment decision out.

Every test here starts the embedded Valkey, the gateway and the four workers as processes.
Sessions made of still photos cannot show a blink, so those tests relax the blink rule (and
only it); the selfie-video tests run with every rule on.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from facepay.app.camera import video_frames
from facepay.config import SessionPolicy
from facepay.contract import pb
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline, wait_until, wait_until_drained

pytestmark = pytest.mark.slow

PHOTO_POLICY = SessionPolicy(require_blink=False)  # still photos cannot blink: that rule alone is off
FULL_POLICY = SessionPolicy()


def photo_cast(faces, size: int | None = None):
    """People with 2+ photos (enroll the first, pay with the rest) and single-photo strangers;
    `size`: only that many of each, those with the most photos first."""
    people = faces.identities()
    enrolled = {name: paths for name, paths in people.items() if len(paths) >= 2}
    strangers = {name: paths for name, paths in people.items() if len(paths) == 1}
    if size is not None:
        enrolled = dict(sorted(enrolled.items(), key=lambda item: -len(item[1]))[:size])
        strangers = dict(list(strangers.items())[:size])
    return enrolled, strangers


def run_photo_sessions(pipeline, faces, cast_size: int | None = None):
    enrolled, strangers = photo_cast(faces, cast_size)
    for name, paths in enrolled.items():
        reply = enroll(pipeline, name, [paths[0].read_bytes()])
        assert reply.status == pb.EnrollResponse.ENROLLED, f"{name}: {reply}"
    backend = Backend(pipeline, "store-1")
    cam = camera(pipeline, "cam-1")
    expected = {}
    for name, paths in enrolled.items():
        session = new_session()
        frames = [p.read_bytes() for p in paths[1:]]
        cam.stream_session(session, (frames * 3)[: max(3, len(frames))])
        expected[session] = name
    for paths in strangers.values():
        session = new_session()
        cam.stream_session(session, [paths[0].read_bytes()] * 3)
        expected[session] = None
    decisions = backend.wait_for(list(expected))
    backend.close()
    cam.close()
    return expected, decisions


def assert_photo_outcomes(expected, decisions):
    assert set(decisions) == set(expected), "every session gets a decision"
    approved_right = wrong = strangers_approved = 0
    for session, person in expected.items():
        event = decisions[session]
        if event.decision == pb.APPROVE:
            wrong += person is not None and event.user_id != person
            strangers_approved += person is None
            approved_right += person is not None and event.user_id == person
    people = sum(p is not None for p in expected.values())
    print(
        f"\nphoto sessions: {approved_right}/{people} enrolled approved with the right id; "
        f"{wrong} wrong-user approvals; {strangers_approved} strangers approved"
    )
    assert wrong == 0 and strangers_approved == 0
    assert approved_right >= 0.8 * people


def test_enrolled_people_are_approved_and_strangers_declined(faces, tmp_path):
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY)
    try:
        expected, decisions = run_photo_sessions(pipeline, faces)
        assert_photo_outcomes(expected, decisions)
        event = next(iter(decisions.values()))
        signed = json.loads(event.payload)
        assert {
            "session_id",
            "store_id",
            "camera_id",
            "decision",
            "user_id",
            "score",
            "threshold",
            "model_ids",
            "reasons",
            "decided_at_ms",
        } <= set(signed)
        assert not any(k in json.dumps(signed) for k in ("embedding", "chip", "image")), "no biometric data in events"
    finally:
        pipeline.stop()


@pytest.mark.redis7
def test_the_same_path_against_the_redis_7_server(faces, tmp_path):
    try:
        redis.Redis(port=6379, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip("no Redis server answers on 127.0.0.1:6379")
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY, redis_url="redis://127.0.0.1:6379/0")
    try:  # the protocol is under test here, not recognition: a few people suffice
        assert_photo_outcomes(*run_photo_sessions(pipeline, faces, cast_size=3))
    finally:
        pipeline.stop()


@pytest.fixture(scope="module")
def selfie_pipeline(faces, tmp_path_factory):
    """Every rule on; the selfie clip's owner enrolled from its first second."""
    pipeline = start_pipeline(tmp_path_factory.mktemp("selfie"), FULL_POLICY)
    clip = faces.path("video/selfie_blink.mp4")
    reply = enroll(pipeline, "selfie-user", list(video_frames(clip, max_frames=3, every=8)))
    assert reply.status == pb.EnrollResponse.ENROLLED, reply
    yield pipeline, clip
    pipeline.stop()


def test_a_live_selfie_video_with_every_rule_on_is_approved(selfie_pipeline):
    pipeline, clip = selfie_pipeline
    backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
    session = new_session()
    cam.stream_session(session, video_frames(clip, max_frames=90, every=2, start=30))
    event = backend.wait_for([session])[session]
    assert event.decision == pb.APPROVE and event.user_id == "selfie-user", event


def test_one_still_frame_replayed_is_a_photo_attack_declined_for_liveness(selfie_pipeline):
    pipeline, clip = selfie_pipeline
    backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
    still = next(iter(video_frames(clip, max_frames=1, start=60)))
    session = new_session()
    cam.stream_session(session, [still] * 30)
    event = backend.wait_for([session])[session]
    assert event.decision == pb.DECLINE and list(event.reasons) == ["no_liveness"]


def test_cameras_of_two_stores_at_once_and_each_backend_sees_only_its_store(faces, tmp_path):
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY)
    try:
        enrolled, _ = photo_cast(faces)
        people = list(enrolled.items())[:3]
        for name, paths in people:
            enroll(pipeline, name, [paths[0].read_bytes()])
        backends = {s: Backend(pipeline, s) for s in ("store-1", "store-2")}
        sessions: dict[str, str] = {}

        def play(camera_id: str) -> None:
            cam = camera(pipeline, camera_id)
            for _name, paths in people:
                session = new_session()
                sessions[session] = cam.store_id
                cam.stream_session(session, [paths[1].read_bytes()] * 3, fps=20)
            cam.close()

        threads = [threading.Thread(target=play, args=(c,)) for c in ("cam-1", "cam-2", "cam-3")]
        [t.start() for t in threads]
        [t.join() for t in threads]
        # Point-of-sale transaction ids are unique per store only: the same id at two stores is
        # two sessions, each decided for its own store.
        same = new_session()
        twins = [
            threading.Thread(
                target=lambda c=c: camera(pipeline, c).stream_session(same, [people[0][1][0].read_bytes()] * 3)
            )
            for c in ("cam-1", "cam-3")
        ]
        [t.start() for t in twins]
        [t.join() for t in twins]
        for backend in backends.values():
            twin = backend.wait_for([same])[same]
            assert twin.decision == pb.APPROVE, (twin.store_id, list(twin.reasons), twin.frames_seen)
        sessions[same] = "both"
        for store, backend in backends.items():
            mine = [s for s, st in sessions.items() if st in (store, "both")]
            got = backend.wait_for(mine)
            assert set(got) == set(mine)
        # A subscription reads the decisions stream in order: once each backend has its store's
        # last session, played after every other decision was written, it has passed them all.
        for store, camera_id in (("store-1", "cam-1"), ("store-2", "cam-3")):
            last, cam = new_session(), camera(pipeline, camera_id)
            cam.stream_session(last, [people[0][1][0].read_bytes()])
            cam.close()
            backends[store].wait_for([last])
        for store, backend in backends.items():
            assert {e.store_id for e in backend.events} == {store}, "no decision of another store"
            assert len([e for e in backend.events if e.session_id == same]) == 1
            backend.close()
        assert_metrics_exported(pipeline)
    finally:
        pipeline.stop()


def assert_metrics_exported(pipeline) -> None:
    """Each process serves Prometheus metrics; workers export the lag an autoscaler reads."""
    import urllib.request

    def scrape(name: str) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{pipeline.metrics_ports[name]}/metrics", timeout=5)
            .read()
            .decode()
        )

    wait_until(
        lambda: 'facepay_group_lag{stage="detector"' in scrape("detector-0"),
        timeout_s=30,
        what="the detector's first refresh of its group gauges",
    )
    detector = scrape("detector-0")
    assert 'facepay_group_lag{stage="detector"' in detector and 'facepay_group_pending{stage="detector"' in detector
    assert 'facepay_messages_in_total{stage="detector"}' in detector
    assert "facepay_decisions_total" in scrape("recognizer-0")
    assert 'facepay_gateway_frames_total{store="store-1"}' in scrape("gateway")


def count_decisions(pipeline, session_ids) -> dict[str, int]:
    client = redis.Redis.from_url(pipeline.settings.redis_url)
    counts = dict.fromkeys(session_ids, 0)
    for _, fields in client.xrange(pipeline.settings.key("decisions")):
        sid = json.loads(fields[b"payload"])["session_id"]
        if sid in counts:
            counts[sid] += 1
    return counts


def kill_while_busy(pipeline, worker: str, stage: str, stream: str, timeout_s: float = 60.0) -> int:
    """SIGKILL `worker` at a moment it holds unacknowledged entries; returns how many it held."""
    client = redis.Redis.from_url(pipeline.settings.redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            held = {c["name"]: c["pending"] for c in client.xinfo_consumers(pipeline.settings.key(stream), stage)}
        except redis.ResponseError:
            held = {}
        if held.get(worker.encode(), held.get(worker, 0)):
            pipeline.kill(worker)
            return held.get(worker.encode(), held.get(worker, 0))
        time.sleep(0.005)
    raise AssertionError(f"{worker} never held pending entries")


def sessions_through_a_crash(pipeline, faces, crash) -> tuple[list[str], dict]:
    """Six sessions of an enrolled person streamed while `crash()` runs; their decisions."""
    enrolled, _ = photo_cast(faces)
    name, paths = next(iter(enrolled.items()))
    enroll(pipeline, name, [paths[0].read_bytes()])
    backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
    sessions = [new_session() for _ in range(6)]
    player = threading.Thread(target=lambda: [cam.stream_session(s, [paths[1].read_bytes()] * 4) for s in sessions])
    player.start()
    crash()
    player.join()
    return sessions, backend.wait_for(sessions)


def test_a_worker_killed_mid_stream_loses_nothing_and_decides_each_session_once(faces, tmp_path):
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY, replicas={"detector": 2})
    try:
        sessions, decisions = sessions_through_a_crash(
            pipeline, faces, lambda: kill_while_busy(pipeline, "detector-0", "detector", "frames")
        )
        assert set(decisions) == set(sessions), "the entries the killed worker held were reclaimed"
        assert not any("timeout" in e.reasons for e in decisions.values()), "no frame went missing"
        wait_until_drained(pipeline)  # no redelivery left that could decide a session again
        assert set(count_decisions(pipeline, sessions).values()) == {1}, "exactly one decision per session"
    finally:
        pipeline.stop()


def test_the_recognizer_killed_and_restarted_decides_each_session_exactly_once(faces, tmp_path):
    """The gallery's owner dies mid-session (as a pod would); its replacement finishes the work."""
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY)

    def crash() -> None:
        kill_while_busy(pipeline, "recognizer-0", "recognizer", "posed")
        pipeline.respawn("recognizer-0")

    try:
        sessions, decisions = sessions_through_a_crash(pipeline, faces, crash)
        assert set(decisions) == set(sessions)
        wait_until_drained(pipeline)  # no redelivery left that could decide a session again
        assert set(count_decisions(pipeline, sessions).values()) == {1}, "exactly one decision per session"
    finally:
        pipeline.stop()


def test_the_embedded_valkey_killed_and_restarted_mid_stream_loses_no_acknowledged_frame(faces, tmp_path):
    pipeline = start_pipeline(tmp_path, PHOTO_POLICY)
    try:
        enrolled, _ = photo_cast(faces)
        name, paths = next(iter(enrolled.items()))
        enroll(pipeline, name, [paths[0].read_bytes()])
        cam = camera(pipeline, "cam-1")
        acknowledged: list[str] = []
        sessions = [new_session() for _ in range(4)]
        for i, session in enumerate(sessions):
            if i == 2:
                pipeline.valkey.kill()  # a crash mid-stream: only what was fsynced survives
                # Back 1.5 s later on the same port and data directory: nothing to reconfigure.
                threading.Timer(1.5, pipeline.valkey.start).start()
            # The camera retries frames refused as UNAVAILABLE while the server is down.
            acks = cam.stream_session(session, [paths[1].read_bytes()] * 3, fps=5)
            assert all(a.code == 0 for a in acks), [a.message for a in acks]
            acknowledged += [a.entry_id for a in acks]
        client = redis.Redis.from_url(pipeline.settings.redis_url)
        stored = {e.decode() for e, _ in client.xrange(pipeline.settings.key("frames"))}
        assert set(acknowledged) <= stored, "every acknowledged frame is still queued"
        backend = Backend(pipeline, "store-1")
        decisions = backend.wait_for(sessions)
        assert set(decisions) == set(sessions), "the pipeline resumed without a manual step"
    finally:
        pipeline.stop()
