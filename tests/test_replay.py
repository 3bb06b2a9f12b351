"""`facepay replay` on real parts: a production pipeline (embedded Valkey, SeaweedFS, real models)
decides real-face sessions, the archiver archives them, and a replay runs them again through the
real stage workers in its own namespace while live traffic keeps flowing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from facepay.app.admin import call
from facepay.app.replay import ReplayOptions, explain, run_replay
from facepay.archive import (
    ArchivedFrame,
    ArchivedSession,
    ArchiveKeys,
    ArchiveSettings,
    ArchiveStore,
    Candidate,
    SignedDecision,
)
from facepay.archive.container import SealedSession
from facepay.config import SessionPolicy
from facepay.contract import pb
from facepay.messages import DecisionMsg, FrameRef
from facepay.signing import sign
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline, wait_until

PHOTO_POLICY = SessionPolicy(require_blink=False)  # still photos cannot blink: that rule alone is off
TAP_STREAMS = ("frames", "faces", "aligned", "posed", "decisions", "decision-records")
ROOT = Path(__file__).resolve().parents[1]


def archive_of(pipeline) -> ArchiveStore:
    settings = ArchiveSettings.from_url(pipeline.settings.archive_url)
    return ArchiveStore(
        settings,
        ArchiveKeys.from_file(Path(pipeline.archive_keys_file)),
        access_key_id=pipeline.s3.credentials.access_key_id,
        secret_access_key=pipeline.s3.credentials.secret_access_key,
    )


def production_state(pipeline, client: redis.Redis) -> dict:
    """What a replay must never touch: consumer groups, lockout counters, the gallery's users."""
    groups = {}
    for stream in TAP_STREAMS:
        groups[stream] = sorted(g["name"] for g in client.xinfo_groups(pipeline.settings.key(stream)))
    # Failure counters and lockouts of cameras and users (live approvals on another camera
    # leave them as they are); the per-session "counted" marks are checked apart.
    limits = {
        k: client.dump(k)
        for k in client.scan_iter(match=pipeline.settings.key("limits", "*"))
        if b":limits:session:" not in k
    }
    users = call(pipeline.settings, "list_users", tenant="demo")
    return {"groups": groups, "limits": limits, "users": users}


def counted_sessions(pipeline, client: redis.Redis) -> set[str]:
    pattern = pipeline.settings.key("limits", "session", "*")
    return {k.decode().split("/", 1)[1].rsplit(":", 1)[0] for k in client.scan_iter(match=pattern)}


@dataclasses.dataclass
class Production:
    """A production pipeline whose archive holds real-face sessions: an approval of each of two
    enrolled people and a stranger's decline, all on cam-1 of store-1."""

    pipeline: object
    backend: Backend
    people: dict
    names: list[str]
    sessions: dict[str, str | None]  # session → the person streamed (None: the stranger)
    originals: dict


@pytest.fixture(scope="module")
def production(faces, tmp_path_factory):
    people = {n: p for n, p in faces.identities().items() if len(p) >= 2}
    stranger = next(p for p in faces.identities().values() if len(p) == 1)
    names = sorted(people)[:2]
    pipeline = start_pipeline(tmp_path_factory.mktemp("production"), PHOTO_POLICY)
    try:
        for name in names:
            assert enroll(pipeline, name, [people[name][0].read_bytes()]).status == pb.EnrollResponse.ENROLLED
        backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
        sessions = {}
        for name in names:
            session = new_session()
            cam.stream_session(session, [p.read_bytes() for p in people[name][1:]] * 3)
            sessions[session] = name
        session = new_session()
        cam.stream_session(session, [stranger[0].read_bytes()] * 3)
        sessions[session] = None
        cam.close()
        originals = backend.wait_for(list(sessions))
        archive = archive_of(pipeline)
        wait_until(lambda: set(sessions) <= archived_sessions(archive), 120, "every session archived")
        yield Production(pipeline, backend, people, names, sessions, originals)
        backend.close()
    finally:
        pipeline.stop()


def archived_sessions(archive: ArchiveStore) -> set[str]:
    now = datetime.now(UTC)
    return {
        r.session_id
        for r in archive.list_sessions("demo", "store-1", now - timedelta(hours=1), now + timedelta(hours=1))
    }


@pytest.mark.slow
def test_a_replay_beside_live_traffic_decides_as_the_original_and_leaves_production_untouched(
    production, tmp_path, monkeypatch
):
    pipeline, backend, people, sessions, originals = (
        production.pipeline,
        production.backend,
        production.people,
        production.sessions,
        production.originals,
    )
    archive = archive_of(pipeline)
    now = datetime.now(UTC)
    assert archive.verify("demo", "store-1", now - timedelta(hours=1), now + timedelta(hours=1)).ok
    client = redis.Redis.from_url(pipeline.settings.redis_url)
    before = production_state(pipeline, client)
    # Live traffic on another camera of the same store, for as long as the replay runs.
    live, stop_live = [], threading.Event()
    approved = [sessions[s] for s, e in originals.items() if e.decision == pb.APPROVE]
    assert approved, "at least one enrolled person is approved"
    payer = approved[0]
    live_cam = camera(pipeline, "cam-2")

    def traffic() -> None:  # one payer after another, each as soon as the one before has paid
        while not stop_live.is_set():
            live_session = new_session()
            live_cam.stream_session(live_session, [p.read_bytes() for p in people[payer][1:]] * 3)
            live.append(live_session)
            backend.wait_for([live_session])

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", pipeline.s3.credentials.access_key_id)
    options = ReplayOptions(
        start=now - timedelta(hours=1),
        end=datetime.now(UTC) + timedelta(minutes=1),
        store="store-1",
        camera="cam-1",
        out=tmp_path / "replay",
    )
    report = run_replay(pipeline.settings, archive, options)
    stop_live.set()
    thread.join(120)
    live_decisions = backend.wait_for(live)
    live_cam.close()

    # Same models, same settings → the same decisions, session for session.
    replayed = {s["session_id"]: s for s in report["sessions"]}
    assert set(replayed) == set(sessions)
    for session_id, original in originals.items():
        again = replayed[session_id]["replayed"]
        assert again is not None, f"{session_id} not decided in the replay"
        expected = "approve" if original.decision == pb.APPROVE else "decline"
        assert (again["decision"], again["user_id"]) == (expected, original.user_id)
    assert report["differences"] == 0, [s["causes"] for s in report["sessions"] if s["differs"]]
    # Two people enrolled: each scored frame names both, the best and the runner-up, archived and
    # replayed alike (the runner-up is who the margin rule told the payer apart from).
    scored = [f for s in report["sessions"] for f in s["frames"] if f["original_top"]]
    assert scored and all({c["user_id"] for c in f["original_top"]} == set(production.names) for f in scored)
    assert all([c["user_id"] for c in f["replayed_top"]] == [c["user_id"] for c in f["original_top"]] for f in scored)
    assert report["replay"]["key_id"].startswith("replay-")
    html = (tmp_path / "replay" / "report.html").read_text()
    assert html.count("<img") >= sum(len(s["frames"]) for s in report["sessions"])

    # Production untouched: groups, lockouts, gallery; no replayed decision in its stream.
    assert live and all(live_decisions[s].decision == pb.APPROVE and live_decisions[s].user_id == payer for s in live)
    assert production_state(pipeline, client) == before
    assert counted_sessions(pipeline, client) <= set(sessions) | set(live)
    decided = Counter(json_session(f) for _, f in client.xrange(pipeline.settings.key("decisions")))
    assert all(decided[s] == 1 for s in sessions), decided
    assert set(decided) == set(sessions) | set(live)
    assert list(client.scan_iter(match=f"{pipeline.settings.namespace}-replay-*")) == []


@pytest.mark.slow
def test_users_delete_erases_the_frames_of_the_sessions_that_approved_the_user_and_keeps_what_the_readme_says(
    production,
):
    """`facepay users delete` as an operator runs it (the real CLI, the operator's Redis user
    and key, the archive's keys): the gallery forgets the user; every archived session that
    approved them loses its frames and data key, keeps its signed decision, and still verifies;
    other people's sessions, and a decline in which the user's face appeared, stay whole
    (README: Erasure)."""
    pipeline = production.pipeline
    name = next(production.sessions[s] for s, e in production.originals.items() if e.decision == pb.APPROVE)
    archive = archive_of(pipeline)
    # A decline showing the user's face: one frame, too few to decide on.
    cam = camera(pipeline, "cam-2")
    glimpse = new_session()
    cam.stream_session(glimpse, [production.people[name][1].read_bytes()])
    cam.close()
    assert production.backend.wait_for([glimpse])[glimpse].decision == pb.DECLINE
    wait_until(lambda: glimpse in archived_sessions(archive), 120, "the decline archived")
    now = datetime.now(UTC)
    refs = archive.list_sessions("demo", "store-1", now - timedelta(hours=1), now + timedelta(hours=1))
    before = {r.session_id: archive.read(r.key) for r in refs}
    approving = {s for s, session in before.items() if session.user_id == name}
    assert approving and any(c.user_id == name for f in before[glimpse].frames for c in f.top_k)

    env = {
        **pipeline.process_env("operator"),
        **pipeline.archive_env(),
        "FACEPAY_OPERATOR_KEY_FILE": str(pipeline.keys_dir / "operator.key"),
    }
    deleted = subprocess.run(
        [sys.executable, "-m", "facepay", "users", "delete", name],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["archive"] == {"erased_sessions": len(approving)}

    assert name not in call(pipeline.settings, "list_users", tenant="demo")["users"]
    for ref in refs:
        was, now_ = before[ref.session_id], archive.read(ref.key)
        assert now_.decision == was.decision and now_.models == was.models, "the signed decision and models stay"
        if ref.session_id in approving:
            assert now_.frames == [], f"{ref.session_id} approved {name}: its frames are erased"
            stored = SealedSession.from_bytes(
                archive.client.get_object(Bucket=archive.bucket, Key=ref.key)["Body"].read()
            )
            assert stored.key is None and all(slot.sealed is None for slot in stored.frames), (
                "ciphertexts and data key gone"
            )
            assert stored.erased
        else:
            assert now_.frames == was.frames, f"{ref.session_id} did not approve {name}: untouched"
    report = archive.verify("demo", "store-1", now - timedelta(hours=1), now + timedelta(hours=1))
    assert report.ok, report.problems
    assert report.erased == len(approving)


def json_session(fields: dict) -> str:
    import json

    return json.loads(fields[b"payload"])["session_id"]


# ---- the causes of a difference (no pipeline needed) ------------------------------------------
def archived(
    user: str | None,
    threshold: float = 0.6,
    models: dict | None = None,
    images: bool = True,
    candidates: tuple[str, ...] = ("alice",),
    rule: dict | None = None,
    runner_up: str | None = None,
) -> ArchivedSession:
    """`runner_up`: each frame's second-best user as archived today ("": the search found none);
    None: as archived before the runner-up was named (its score only)."""
    event = {
        "session_id": "s",
        "store_id": "st",
        "decision": "approve" if user else "decline",
        "user_id": user or "",
        "threshold": threshold,
        "rule": "voted" if user else "no_match",
        **(rule or {}),
    }
    signed = sign(event, "k", "k1")
    second = [Candidate(runner_up, 0.5)] if runner_up else []
    frames = [
        ArchivedFrame(
            i,
            0,
            b"\xff\xd8jpeg" if images else b"",
            "jpeg",
            top_k=[Candidate(c, 0.7) for c in candidates] + second,
            second_score=-1.0 if runner_up == "" else 0.5,
        )
        for i in range(3)
    ]
    return ArchivedSession(
        "s",
        "t",
        "st",
        "c",
        0,
        0,
        SignedDecision(signed[b"payload"], signed[b"sig"].decode(), "k1"),
        models or {"recognizer": "dlib-resnet-v1"},
        threshold,
        {},
        frames,
    )


def replayed_event(user: str | None, threshold: float = 0.6, recognizer: str = "dlib-resnet-v1") -> dict:
    return {
        "decision": "approve" if user else "decline",
        "user_id": user or "",
        "threshold": threshold,
        "model_ids": {"recognizer": recognizer},
    }


def test_each_cause_of_a_difference_is_named():
    assert explain(archived("alice"), replayed_event(None, 0.8), [], {"alice"}) == ["threshold changed: 0.6 → 0.8"]
    assert explain(archived("alice"), replayed_event(None, recognizer="faceres-hse-v1"), [], {"alice"}) == [
        "model changed: recognizer dlib-resnet-v1 → faceres-hse-v1"
    ]
    assert explain(archived("alice"), replayed_event(None), [], set()) == ["user deleted since: alice"]
    assert explain(archived(None, candidates=()), replayed_event("bob"), [{"top_user": "bob"}], {"bob"}) == [
        "user enrolled since: bob"
    ]
    # The archived frames' runner-up was in the gallery then: not enrolled since.
    assert explain(
        archived(None, runner_up="bob"), replayed_event("bob"), [{"sequence": 0, "top_user": "bob"}], {"alice", "bob"}
    ) == ["unexplained: same models, threshold and gallery"]
    # A runner-up the archived frame did not have (it named its own, or had none) is new in the
    # gallery, and it can move the margin; an older archive (score only) cannot tell.
    runner_up_now = [{"sequence": 0, "top_user": "alice", "second_user": "carol"}]
    assert explain(archived("alice", runner_up="bob"), replayed_event(None), runner_up_now, {"alice", "carol"}) == [
        "user enrolled since: carol"
    ]
    assert explain(archived("alice", runner_up=""), replayed_event(None), runner_up_now, {"alice", "carol"}) == [
        "user enrolled since: carol"
    ]
    assert explain(archived("alice"), replayed_event(None), runner_up_now, {"alice", "carol"}) == [
        "unexplained: same models, threshold and gallery"
    ]
    assert explain(archived("alice", images=False), replayed_event(None), [], {"alice"}) == [
        "frame missing (erased, or never reached the archiver)"
    ]
    assert explain(archived("alice"), None, [], {"alice"}) == ["not decided in the replay"]
    assert explain(
        archived("alice", rule={"margin": 0.02, "min_agreeing_frames": 3}),
        {**replayed_event(None), "margin": 0.05, "min_agreeing_frames": 3},
        [],
        {"alice"},
    ) == ["session rule changed: margin 0.02 → 0.05"]


def test_the_html_report_shows_each_frames_scores_the_rule_and_the_cause():
    from facepay.app.replay import render_html, session_report

    original = archived("alice")
    # Frame 0 as archived today (the runner-up named), the others as archived before (its score only).
    original = dataclasses.replace(
        original,
        frames=[
            dataclasses.replace(
                f, top_k=[*f.top_k, Candidate("bob", 0.41)] if f.index == 0 else f.top_k, second_score=0.41
            )
            for f in original.frames
        ],
    )
    message = DecisionMsg(
        ref=FrameRef("s", "st", "c", 0, 0),
        frames=[
            {
                "sequence": i,
                "top_user": "alice",
                "top_score": 0.5,
                "second_user": "carol",
                "second_score": 0.3,
                "reason": "",
            }
            for i in range(3)
        ],
    )
    report = session_report(
        original, ({**replayed_event(None, 0.8), "rule": "unknown_face"}, message), {"alice", "bob", "carol"}
    )
    first, second = report.frames[0], report.frames[1]
    assert first["original_top"] == [{"user_id": "alice", "score": 0.7}, {"user_id": "bob", "score": 0.41}]
    assert first["replayed_top"] == [{"user_id": "alice", "score": 0.5}, {"user_id": "carol", "score": 0.3}]
    assert second["original_top"] == [{"user_id": "alice", "score": 0.7}] and second["original_second"] == 0.41
    html = render_html(
        {
            "replay": {
                "namespace": "fp-replay-x",
                "sessions": 1,
                "frames": 3,
                "model": "m",
                "threshold": 0.8,
                "from": "a",
                "to": "b",
            },
            "sessions": [dataclasses.asdict(report)],
            "differences": 1,
        }
    )
    assert "alice 0.700 (2nd bob 0.410) → alice 0.500 (2nd carol 0.300)" in html
    assert "alice 0.700 (2nd 0.410) → alice 0.500 (2nd carol 0.300)" in html, "an older archive: the score only"
    assert "rule voted" in html and "rule unknown_face" in html and "threshold changed: 0.6 → 0.8" in html


def test_the_replay_namespace_is_isolated_and_accepts_old_frames_there_only(tmp_path):
    """Settings of a replay: own namespace, own HMAC key id, no production key file, failure
    limits off, an embedded gallery copied; the frame-age bound lifted in the replay only."""
    import time as clock

    from facepay import keys as component_keys
    from facepay.app.replay import REPLAY_MAX_FRAME_AGE_S, replay_settings
    from facepay.config import Settings
    from facepay.messages import FrameRef
    from facepay.runtime.envelope import Unauthenticated, attest, open_entry, origin_problem, seal

    gallery = tmp_path / "gallery"
    (gallery / "faces__m").mkdir(parents=True)
    (gallery / "faces__m" / "segment").write_bytes(b"vectors")
    production_keys, replay_keys = (
        component_keys.generate(tmp_path / "prod"),
        component_keys.generate(tmp_path / "replay"),
    )
    production = Settings(
        namespace="fp",
        gallery_url=f"edge://{gallery}",
        key_file=str(tmp_path / "prod" / "gateway.key"),
        trusted_keys_file=str(production_keys),
        signing_key="prod-secret",
        signing_key_id="k1",
    )
    options = ReplayOptions(start=datetime.now(UTC) - timedelta(days=2), end=datetime.now(UTC))
    replay = replay_settings(production, tmp_path / "work", [archived("alice", threshold=0.77)], options)

    assert replay.namespace.startswith("fp-replay-") and replay.signing_key_id.startswith("replay-")
    assert (
        replay.signing_key == "" and replay.key_file == "" and replay.trusted_keys_file == ""
    )  # fresh keys, never production's
    assert replay.gallery_url == f"edge://{tmp_path / 'work' / 'gallery'}"
    assert (tmp_path / "work" / "gallery" / "faces__m" / "segment").read_bytes() == b"vectors"
    assert replay.limits.max_consecutive >= 10**9 and replay.policy.threshold == 0.77

    # A frame the replay's gateway attested two days ago: accepted by the replay's bound, not by production's.
    gateway = component_keys.load_signer(str(tmp_path / "replay" / "gateway.key"))
    old_ms = int((clock.time() - 2 * 86400) * 1000)
    ref = attest(FrameRef("s", "st", "c", 0, old_ms, received_ms=old_ms), gateway, b"image")
    replay_trusted = component_keys.load_trusted(str(replay_keys))
    assert replay.max_frame_age_s == REPLAY_MAX_FRAME_AGE_S
    assert origin_problem(ref, replay_trusted, replay.max_frame_age_s) == ""
    assert "ago" in origin_problem(ref, replay_trusted, production.max_frame_age_s)
    # And production, which trusts only its own keys, refuses anything the replay signs.
    entry = seal({b"m": b"body"}, "fp:frames", gateway)
    with pytest.raises(Unauthenticated):
        open_entry(entry, "fp:frames", component_keys.load_trusted(str(production_keys)), {"gateway"})
    assert "not attested" in origin_problem(ref, component_keys.load_trusted(str(production_keys)))


def test_the_replay_reinjects_frames_as_they_were_received(tmp_path):
    """Capture time and phone suffix are what the original pipeline had: the recognizer's
    gallery search is filtered by the suffix, so a replay without it could match someone else."""
    from facepay.app.replay import ReplayRun
    from facepay.config import Settings
    from facepay.messages import FrameMsg, SessionEndMsg, decode
    from facepay.runtime.envelope import open_entry, origin_problem

    session = archived("alice")
    frames = [
        dataclasses.replace(
            f, received_ms=1_700_000_000_000 + f.index, captured_ms=1_699_999_999_900 + f.index, phone_suffix="1234"
        )
        for f in session.frames
    ]
    session = dataclasses.replace(session, frames=frames)
    run = ReplayRun(Settings(namespace="fp-replay-t"), tmp_path)
    run.pipeline.valkey.start()
    try:
        run.client = redis.Redis.from_url(run.pipeline.valkey.url)
        run.inject(session)
        stream = run.settings.key("frames")
        messages = [decode(open_entry(f, stream, run.trusted, {"gateway"})[1]) for _, f in run.client.xrange(stream)]
    finally:
        run.pipeline.valkey.stop()
    injected = [m for m in messages if isinstance(m, FrameMsg)]
    assert [(m.ref.captured_ms, m.ref.received_ms, m.ref.phone_suffix) for m in injected] == [
        (f.captured_ms, f.received_ms, "1234") for f in frames
    ]
    assert all(origin_problem(m.ref, run.trusted, 20 * 365 * 86400) == "" for m in injected)
    assert isinstance(messages[-1], SessionEndMsg) and messages[-1].frame_count == 3


def test_replay_refuses_bad_options_with_a_clear_error_before_starting_anything():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEPAY_ARCHIVE")}

    def replay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "facepay", "replay", *args],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert "is not a time" in replay("--from", "yesterday").stderr
    bad = replay("--from", "1h", "--threshold", "5")
    assert bad.returncode == 2 and "--threshold must be a cosine" in bad.stderr
    unset = replay("--from", "1h")
    assert unset.returncode == 2 and "FACEPAY_ARCHIVE_URL" in unset.stderr
