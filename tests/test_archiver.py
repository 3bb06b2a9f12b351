"""The archiver stage on real parts: embedded Valkey, embedded SeaweedFS (`weed`), the runtime's
StreamWorker, entries signed by each component's real key (the test keyset) and real face
photos. The stages upstream are played by this test (their outputs are written as they would
write them): the whole pipeline with models runs in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from facepay import keys as component_keys
from facepay.archive import ArchiveKeys, ArchiveSettings, ArchiveStore, Candidate, EmbeddedS3
from facepay.archive.keys import TenantKeys
from facepay.config import Settings
from facepay.messages import (
    FIELD,
    AlignedMsg,
    DecisionMsg,
    EmbeddingMsg,
    FaceMsg,
    FrameMsg,
    FrameRef,
    PosedMsg,
    Rejection,
    SessionEndMsg,
    decode,
)
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.runtime.envelope import attest, seal
from facepay.runtime.health import serve_health
from facepay.runtime.redis_conn import connect
from facepay.runtime.worker import _TRIM_SAFELY, StreamWorker
from facepay.signing import sign
from services.archiver.stage import ArchiverStage
from tests import keysets

TENANT, STORE, CAMERA = "acme", "store-1", "cam-1"
HMAC_KEY = "archiver-test-decision-key"


@pytest.fixture(scope="module")
def photos(request: pytest.FixtureRequest) -> list[bytes]:
    """Real face photos (the `faces` data), else scikit-image's astronaut as JPEG."""
    try:
        faces = request.getfixturevalue("faces")
        return [p.read_bytes() for people in faces.identities().values() for p in people][:6]
    except pytest.skip.Exception:
        import cv2
        from skimage import data

        image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        return [cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes() for q in (70, 80, 90)]


def embedding_of(sequence: int) -> list[float]:
    return [round(0.01 * (sequence + 1) * (i % 7 - 3), 4) for i in range(128)]


class Upstream:
    """Writes what the gateway, detector, aligner, pose and recognizer write, each signed with
    its own key, for one payment session at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url)
        folder = keysets.test_keyset()
        self.signers = {c: component_keys.load_signer(str(folder / f"{c}.key")) for c in component_keys.COMPONENTS}

    def _xadd(self, stream: str, body: bytes, as_: str, extra: dict | None = None) -> None:
        key = self.settings.key(stream)
        self.redis.xadd(key, {**seal({FIELD: body}, key, self.signers[as_]), **(extra or {})})

    def session(
        self,
        session_id: str,
        images: list[bytes],
        approve: bool = True,
        store: str = STORE,
        phone_suffix: str = "",
        embeddings: bool = False,
        tenant: str = TENANT,
    ) -> None:
        """`embeddings`: the recognizer also writes each face's embedding (archive_keep_embeddings)."""
        refs = []
        for seq, image in enumerate(images):
            ref = FrameRef(
                session_id,
                store,
                CAMERA,
                seq,
                int(time.time() * 1000) - 50,
                tenant_id=tenant,
                phone_suffix=phone_suffix,
                received_ms=int(time.time() * 1000),
            )
            ref = attest(ref, self.signers["gateway"], image)
            refs.append(ref)
            self._xadd("frames", FrameMsg(ref=ref, image=image).encode(), "gateway")
            if seq == len(images) - 1 and len(images) > 2:  # the last frame: no face found
                for stream, stage in (("faces", "detector"), ("aligned", "aligner"), ("posed", "pose")):
                    self._xadd(stream, Rejection(ref=ref, stage="detector", reason="no_face").encode(), stage)
                continue
            self._xadd(
                "faces",
                FaceMsg(
                    ref=ref,
                    crop=b"crop",
                    box=(1, 2, 30, 40),
                    points5=[[5.0, 6.0]] * 5,
                    frame_box=(10, 20, 110, 140),
                    frame_size=(640, 480),
                    score=0.99,
                    faces_in_frame=2,
                ).encode(),
                "detector",
            )
            self._xadd(
                "aligned",
                AlignedMsg(
                    ref=ref, landmarks=[[1.0, 2.0]] * 68, ear=(0.3, 0.32), antispoof=0.8, liveness=0.7, det_score=0.99
                ).encode(),
                "aligner",
            )
            self._xadd("posed", PosedMsg(ref=ref, pitch=1.5, yaw=-3.0, roll=0.5, eligible=True).encode(), "pose")
            if embeddings:
                self._xadd(
                    "embeddings",
                    EmbeddingMsg(ref=ref, vector=embedding_of(seq), space="dlib-resnet-v1+dlib68").encode(),
                    "recognizer",
                )
        end = attest(
            FrameRef(session_id, store, CAMERA, 0, 0, tenant_id=tenant, received_ms=int(time.time() * 1000)),
            self.signers["gateway"],
        )
        self._xadd("frames", SessionEndMsg(ref=end, frame_count=len(images)).encode(), "gateway")
        self.decide(refs[0], len(images), approve)

    def decide(self, ref: FrameRef, frames: int, approve: bool) -> None:
        event = {
            "session_id": ref.session_id,
            "store_id": ref.store_id,
            "camera_id": CAMERA,
            "tenant_id": ref.tenant_id,
            "decision": "approve" if approve else "decline",
            "user_id": "alice" if approve else "",
            "score": 0.71,
            "threshold": 0.6,
            "rule": "voted",
            "model_ids": {"detector": "mtcnn-v1", "recognizer": "dlib-resnet-v1"},
            "first_frame_ms": ref.received_ms,
            "decided_at_ms": int(time.time() * 1000),
            "frames_seen": frames,
            "frames_eligible": frames - 1,
            "reasons": [],
        }
        signed = sign(event, HMAC_KEY, "k1")
        # Each frame's two best users; the last one as an older recognizer handed it over (the
        # runner-up's score, not who it was).
        scores = [
            {
                "sequence": i,
                "top_user": "alice",
                "top_score": 0.7 + i / 100,
                "second_score": 0.2,
                "reason": "",
                **({"second_user": "bob"} if i < frames - 1 else {}),
            }
            for i in range(frames)
        ]
        message = DecisionMsg(
            ref=ref,
            payload=signed[b"payload"],
            signature=signed[b"sig"].decode(),
            key_id="k1",
            frames=scores,
            policy={"min_agreeing_frames": 3, "require_blink": True},
        )
        # As the recognizer writes them: the signed event for backends, the record for the archiver.
        self.redis.xadd(self.settings.key("decisions"), {**signed, b"store": ref.store_id.encode()})
        self._xadd("decision-records", message.encode(), "recognizer")


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedS3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def setup(valkey, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings of a fresh namespace and archive prefix; the archiver's keys and credentials."""
    keys_file = tmp_path / "archive-keys.yaml"
    ArchiveKeys.generate([TENANT, "default"]).write(keys_file)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials.secret_access_key)
    settings = Settings(
        redis_url=valkey.url,
        namespace=f"arc{uuid.uuid4().hex[:6]}",
        claim_idle_ms=1000,
        batch_size=8,
        batch_wait_ms=20,
        archive_url=f"{s3.url}/facepay-archive/t{uuid.uuid4().hex[:8]}",
        archive_keys_file=str(keys_file),
        archive_gather_grace_s=2.0,
        **keysets.signing_as("archiver"),
    )
    return settings


def reader(settings: Settings) -> ArchiveStore:
    archive = ArchiveSettings.from_url(settings.archive_url, keys_file=Path(settings.archive_keys_file))
    store = ArchiveStore.from_settings(archive)
    store.ensure_bucket()  # the archiver may not have made it yet
    return store


class RunningArchiver:
    def __init__(self, settings: Settings) -> None:
        self.worker = StreamWorker(ArchiverStage(settings), settings, consumer=f"archiver-{uuid.uuid4().hex[:4]}")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.worker.stage.start()
        self.worker.heartbeat.started()  # as StreamWorker.run: the probes read it
        try:
            while not self.worker._stopping:
                self.worker.run_once()
        finally:
            self.worker.stage.stop()

    def __enter__(self) -> RunningArchiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(30)


def held_entries(tenant: str) -> float | None:
    """Entries the archiver holds for `tenant` (facepay_deferred_entries), None once cleared."""
    labels = {"stage": "archiver", "reason": "no_archive_key", "scope": tenant}
    return REGISTRY.get_sample_value("facepay_deferred_entries", labels)


def held_for_s(tenant: str) -> float | None:
    labels = {"stage": "archiver", "reason": "no_archive_key", "scope": tenant}
    return REGISTRY.get_sample_value("facepay_deferred_oldest_seconds", labels)


def readiness(port: int) -> tuple[int, dict]:
    """/readyz's status and body (a line of JSON)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def archived_ids(settings: Settings, store: str = STORE, tenant: str = TENANT) -> set[str]:
    now = datetime.now(UTC)
    refs = reader(settings).list_sessions(tenant, store, now - timedelta(hours=1), now + timedelta(hours=1))
    return {r.session_id for r in refs}


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def pending(settings: Settings, stream: str) -> int:
    client = connect(settings.redis_url)
    for group in client.xinfo_groups(settings.key(stream)):
        if group["name"] == b"archiver":
            return int(group["pending"]) + int(group.get("lag") or 0)
    return -1


def test_a_decided_session_is_archived_once_with_its_frames_as_received_and_every_stages_output(setup, photos):
    upstream = Upstream(setup)
    images = photos[:4]
    with RunningArchiver(setup):
        upstream.session("s-1", images, phone_suffix="1234")
        wait_until(lambda: "s-1" in archived_ids(setup), what="session archived")
        wait_until(
            lambda: all(pending(setup, s) == 0 for s in ("frames", "faces", "aligned", "posed", "decision-records")),
            what="every entry acknowledged",
        )
    store = reader(setup)
    now = datetime.now(UTC)
    (ref,) = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    session = store.read(ref.key)
    assert [f.image for f in session.frames] == images  # byte for byte, as the camera sent them
    assert all(f.image_format in ("jpeg", "png") for f in session.frames)
    first, last = session.frames[0], session.frames[-1]
    assert first.face_box == (10, 20, 110, 140) and first.detector_score == pytest.approx(0.99)
    assert len(first.landmarks) == 68 and first.eye_aspect_ratio == pytest.approx(0.31)
    assert first.liveness == {"antispoof": pytest.approx(0.8), "liveness": pytest.approx(0.7)}
    assert (first.pitch, first.yaw, first.roll, first.eligible) == (1.5, -3.0, 0.5, True)
    # Who the search put first and second, with their scores: an auditor sees whom the payer
    # was told apart from (the margin rule reads top − second).
    assert first.top_k == [Candidate("alice", pytest.approx(0.7)), Candidate("bob", pytest.approx(0.2))]
    assert first.second_score == pytest.approx(0.2)
    assert last.top_k == [Candidate("alice", pytest.approx(0.73))], "an older recognizer named no runner-up"
    assert last.second_score == pytest.approx(0.2), "its score is still archived"
    # What else the decision depended on: the gallery search's phone-suffix filter, the
    # camera's capture time, the frame count it announced.
    assert [f.phone_suffix for f in session.frames] == ["1234"] * 4
    assert all(f.received_ms - f.captured_ms >= 50 for f in session.frames)
    assert session.frame_count == 4
    assert first.faces_in_frame == 2, "a bystander the detector told apart from the payer"
    assert all(f.embedding is None for f in session.frames), "no embedding unless configured"
    assert last.rejection == "detector:no_face" and last.face_box is None
    assert session.decision.fields["user_id"] == "alice" and session.threshold == 0.6
    assert session.models["recognizer"] == "dlib-resnet-v1" and session.policy["min_agreeing_frames"] == 3
    client = connect(setup.redis_url)
    assert client.keys(setup.key("archiver", "staged", "*")) == []  # the per-session index is gone
    assert store.verify(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1)).ok


def test_an_entry_not_signed_by_its_stage_is_left_out_of_the_archive(setup, photos):
    upstream = Upstream(setup)
    # A forged face for frame 0 of s-2, signed by the gateway instead of the detector, arrives first.
    forged_ref = attest(FrameRef("s-2", STORE, CAMERA, 0, 0, tenant_id=TENANT), upstream.signers["gateway"], photos[0])
    upstream._xadd("faces", FaceMsg(ref=forged_ref, frame_box=(0, 0, 1, 1), score=0.01).encode(), "gateway")
    with RunningArchiver(setup):
        upstream.session("s-2", photos[:3])
        wait_until(lambda: "s-2" in archived_ids(setup), what="session archived")
        wait_until(lambda: pending(setup, "faces") == 0, what="the forged entry acknowledged too")
    now = datetime.now(UTC)
    store = reader(setup)
    (ref,) = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    assert store.read(ref.key).frames[0].face_box == (10, 20, 110, 140)  # the detector's, not the forgery


def test_an_archive_outage_makes_the_archiver_fall_behind_and_loses_no_session(setup, s3, photos):
    """weed SIGKILLed mid-stream: sessions decided meanwhile stay pending (their frames are kept
    from trimming), and all are archived once it is back; the chain verifies."""
    upstream = Upstream(setup)
    sessions = [f"o-{i}" for i in range(9)]
    with RunningArchiver(setup):
        for session_id in sessions[:3]:
            upstream.session(session_id, photos[:3])
        wait_until(lambda: set(sessions[:3]) <= archived_ids(setup), what="first sessions archived")
        s3.kill()
        try:
            for session_id in sessions[3:]:
                upstream.session(session_id, photos[:3])
            wait_until(lambda: pending(setup, "decision-records") >= 1, what="the archiver falls behind")
            wait_until(lambda: pending(setup, "frames") >= 6 * 4, what="frames held")  # 6 × (3 frames + end)
            # The runtime's trimming, with no retention and a length bound of 1, keeps them all.
            client = connect(setup.redis_url)
            for stream in ("frames", "faces", "aligned", "posed"):
                client.eval(_TRIM_SAFELY, 1, setup.key(stream), int(time.time() * 1000), 1, "0")
            assert client.xlen(setup.key("frames")) >= 6 * 4
        finally:
            s3.restart()
        wait_until(
            lambda: set(sessions) <= archived_ids(setup), timeout_s=120, what="every session archived after the outage"
        )
        wait_until(
            lambda: all(pending(setup, s) == 0 for s in ("frames", "faces", "aligned", "posed", "decision-records")),
            what="every entry acknowledged",
        )
    now = datetime.now(UTC)
    store = reader(setup)
    report = store.verify(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    assert report.ok, report
    for ref in store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1)):
        assert [f.image for f in store.read(ref.key).frames] == photos[:3]


def test_the_archiver_sweeps_sessions_older_than_the_retention(setup, photos):
    from tests.test_archive_store import session_at

    store = reader(setup)
    old = session_at(datetime.now(UTC) - timedelta(days=100), photos, tenant=TENANT, store=STORE)
    store.archive(old)
    settings = setup.replace(archive_sweep_every_s=1)

    def old_ones() -> list:
        now = datetime.now(UTC)
        return store.list_sessions(TENANT, STORE, now - timedelta(days=365), now - timedelta(days=30))

    assert len(old_ones()) == 1
    with RunningArchiver(settings):
        wait_until(lambda: not old_ones(), what="the old session swept")


def test_two_archiver_replicas_archive_every_session_once(setup, photos):
    upstream = Upstream(setup)
    sessions = [f"r-{i}" for i in range(8)]
    with RunningArchiver(setup), RunningArchiver(setup):
        for session_id in sessions:
            upstream.session(session_id, photos[:3])
        wait_until(lambda: set(sessions) <= archived_ids(setup), what="every session archived")
        wait_until(
            lambda: all(pending(setup, s) == 0 for s in ("frames", "faces", "aligned", "posed", "decision-records")),
            what="every entry acknowledged",
        )
    now = datetime.now(UTC)
    store = reader(setup)
    refs = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    assert sorted(r.session_id for r in refs) == sorted(sessions)  # each once
    assert all(len(store.read(r.key).frames) == 3 for r in refs)
    assert store.verify(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1)).ok


def test_frames_read_by_an_archiver_that_died_before_filing_them_are_taken_over(setup, photos):
    upstream = Upstream(setup)
    upstream.session("d-1", photos[:3])
    client = connect(setup.redis_url)
    taps = {setup.key(t): ">" for t in ("frames", "faces", "aligned", "posed")}
    for stream in taps:
        client.xgroup_create(stream, "archiver", id="0")
    client.xreadgroup("archiver", "died", taps, count=100)  # read, never indexed: that replica died
    with RunningArchiver(setup):
        wait_until(lambda: "d-1" in archived_ids(setup), what="the session archived")
    now = datetime.now(UTC)
    store = reader(setup)
    (ref,) = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    assert [f.image for f in store.read(ref.key).frames] == photos[:3]


def test_a_dead_archivers_frames_not_yet_claimable_are_waited_for_though_their_pose_is(setup, photos):
    """The pose stage's entries are claimable before the frames' (the dead replica read them
    earlier, or a take-over pass crossed claim_idle_ms between two taps): a session whose posed
    entries are all in is not complete while its frames, faces or aligned entries are not."""
    upstream = Upstream(setup)
    upstream.session("d-2", photos[:3])
    client = connect(setup.redis_url)
    for tap in ("frames", "faces", "aligned", "posed"):
        client.xgroup_create(setup.key(tap), "archiver", id="0")
    client.xreadgroup("archiver", "died", {setup.key("posed"): ">"}, count=100)
    wait_until(
        lambda: all(
            p["time_since_delivered"] >= setup.claim_idle_ms
            for p in client.xpending_range(setup.key("posed"), "archiver", "-", "+", 100)
        ),
        what="the dead replica's posed entries claimable",
    )
    # Its other taps' entries, read just before it died: claimable only claim_idle_ms from now.
    client.xreadgroup("archiver", "died", {setup.key(t): ">" for t in ("frames", "faces", "aligned")}, count=100)
    with RunningArchiver(setup):
        wait_until(lambda: "d-2" in archived_ids(setup), what="the session archived")
    now = datetime.now(UTC)
    store = reader(setup)
    (ref,) = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    frames = store.read(ref.key).frames
    assert [f.image for f in frames] == photos[:3], "every frame archived with its image"
    assert all(f.detector_score for f in frames[:2]) and all(f.landmarks for f in frames[:2])


def chained_ids(settings: Settings, store: str) -> set[str]:
    """Sessions of the store that are archived and on its hash chain (not held outside it)."""
    quarantined = {p.session_id for p in verify(settings, store).problems if p.kind == "quarantined"}
    return archived_ids(settings, store) - quarantined


def verify(settings: Settings, store: str):
    now = datetime.now(UTC)
    return reader(settings).verify(TENANT, store, now - timedelta(hours=1), now + timedelta(hours=1))


def test_a_tampered_chain_of_one_store_holds_back_neither_the_other_stores_nor_its_own_sessions(setup, photos, caplog):
    """Store A's chain head is forged: store B goes on being archived; A's new session is
    sealed and kept outside the chain (quarantined, reported by verify), its frames leave Redis,
    and once the operator restores A's head it is chained."""
    upstream, archive = Upstream(setup), reader(setup)
    settings = setup.replace(archive_quarantine_retry_s=1)
    with RunningArchiver(settings):
        upstream.session("q-a1", photos[:3], store="store-a")
        upstream.session("q-b1", photos[:3], store="store-b")
        wait_until(
            lambda: "q-a1" in archived_ids(setup, "store-a") and "q-b1" in archived_ids(setup, "store-b"),
            what="both stores archived",
        )
        head_key = f"{archive._chain(TENANT, 'store-a')}head.json"
        genuine_head = archive.client.get_object(Bucket=archive.bucket, Key=head_key)["Body"].read()
        archive.client.put_object(
            Bucket=archive.bucket, Key=head_key, Body=genuine_head.replace(b'"seq":1', b'"seq":7')
        )

        upstream.session("q-a2", photos[:3], store="store-a")
        for i in range(3):
            upstream.session(f"q-b{i + 2}", photos[:3], store="store-b")
        wait_until(lambda: {"q-b2", "q-b3", "q-b4"} <= archived_ids(setup, "store-b"), what="store B archived on")
        wait_until(
            lambda: all(pending(setup, s) == 0 for s in ("frames", "faces", "aligned", "posed", "decision-records")),
            what="nothing held in Redis, A's session included",
        )
        # Loud: an error naming the store, a metric to alert on, and verify (below).
        assert any(
            r.levelname == "ERROR" and "quarantined" in r.getMessage() and getattr(r, "store", "") == "store-a"
            for r in caplog.records
        )
        assert (
            REGISTRY.get_sample_value(
                "facepay_archive_quarantined_sessions_total", {"tenant": TENANT, "store": "store-a"}
            )
            >= 1
        )
        report = verify(setup, "store-a")
        assert {"bad_signature", "quarantined"} <= report.kinds()
        assert [p.session_id for p in report.problems if p.kind == "quarantined"] == ["q-a2"]
        assert [
            f.image for f in archive.read(archive.session_key(TENANT, "store-a", *_decided("q-a2", archive))).frames
        ] == photos[:3]
        assert verify(setup, "store-b").ok

        archive.client.put_object(Bucket=archive.bucket, Key=head_key, Body=genuine_head)  # restored by the operator
        wait_until(lambda: verify(setup, "store-a").ok, what="A's quarantined session chained once its chain is whole")
    assert chained_ids(setup, "store-a") == {"q-a1", "q-a2"}


def _decided(session_id: str, archive: ArchiveStore) -> tuple[int, str]:
    now = datetime.now(UTC)
    (ref,) = [
        r
        for r in archive.list_sessions(TENANT, "store-a", now - timedelta(hours=1), now + timedelta(hours=1))
        if r.session_id == session_id
    ]
    return ref.decided_ms, session_id


def test_embeddings_reach_the_archive_when_configured_and_only_then(setup, photos):
    upstream, archive = Upstream(setup), reader(setup)
    with RunningArchiver(setup.replace(archive_keep_embeddings=True)):
        upstream.session("e-kept", photos[:3], embeddings=True)
        wait_until(lambda: "e-kept" in archived_ids(setup), what="session archived")
    with RunningArchiver(setup):
        upstream.session("e-not-kept", photos[:3], embeddings=True)
        wait_until(lambda: "e-not-kept" in archived_ids(setup), what="session archived")
        wait_until(lambda: pending(setup, "embeddings") == 0, what="the embeddings acknowledged, not held")
    now = datetime.now(UTC)
    sessions = {
        r.session_id: archive.read(r.key)
        for r in archive.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    }
    kept = sessions["e-kept"].frames
    assert [f.embedding for f in kept[:2]] == [pytest.approx(embedding_of(0)), pytest.approx(embedding_of(1))]
    assert kept[2].embedding is None, "the frame with no face has none"
    assert all(f.embedding is None for f in sessions["e-not-kept"].frames)


def test_the_recognizer_hands_each_faces_embedding_to_the_archiver_only_when_configured(valkey, tmp_path, astronaut):
    """The real recognizer stage and model: with archive_keep_embeddings, each payment face it
    embeds goes to `{ns}:embeddings` (signed by the recognizer, read by the archiver only — not
    into the decisions stream payment backends read); without it, nowhere."""
    import cv2

    from services.recognizer.stage import RecognizerStage

    settings = Settings(
        redis_url=valkey.url,
        namespace=f"rec{uuid.uuid4().hex[:6]}",
        signing_key="11" * 32,
        gallery_url=f"edge://{tmp_path}/gallery",
        archive_keep_embeddings=True,
        **keysets.signing_as("recognizer"),
    )
    stage = RecognizerStage(settings)
    stage.start()
    chip = cv2.imencode(".png", cv2.resize(astronaut[30:230, 150:350], (150, 150)))[1].tobytes()

    def session(session_id: str) -> list:
        now = int(time.time() * 1000)
        posed = [
            PosedMsg(
                ref=FrameRef(session_id, STORE, CAMERA, seq, now, tenant_id=TENANT, received_ms=now),
                chips={stage.embedder.chip_template: chip},
                ear=(0.3, 0.3),
                eligible=seq != 1,
                reason="" if seq != 1 else "pose_yaw",
            )
            for seq in range(3)
        ]
        emits = stage.process(posed)
        assert all(
            FIELD not in e.payload and all(b"embedding" not in r.payload for r in e.beside)
            for e in emits
            if e.stream == "decisions"
        )
        return [decode(e.payload) for e in emits if e.stream == "embeddings"]

    try:
        handed = session("s-kept")
        stage.settings = settings.replace(archive_keep_embeddings=False)
        assert session("s-not-kept") == []
    finally:
        stage.stop()
    assert [m.ref.sequence for m in handed] == [0, 1, 2], "every face the recognizer embedded, pose-rejected ones too"
    assert all(isinstance(m, EmbeddingMsg) and len(m.vector) == stage.embedder.dim for m in handed)
    assert handed[0].space == stage.gallery_owner.space_id


def test_a_tenant_without_an_archive_key_waits_alone_and_is_archived_once_its_key_is_added(setup, photos, caplog):
    """A configuration error for one tenant: its sessions stay pending (an error naming it, a
    metric, the group's pending count), their frames kept from trimming; other tenants' sessions
    are archived meanwhile; once its key is in the keys file, its sessions are archived."""
    upstream, client = Upstream(setup), connect(setup.redis_url)
    with RunningArchiver(setup) as archiver:
        probes = serve_health(archiver.worker.heartbeat, free_port())
        assert probes is not None
        upstream.session("t-new", photos[:3], tenant="newco")
        upstream.session("t-acme1", photos[:3])
        upstream.session("t-acme2", photos[:3])
        wait_until(lambda: {"t-acme1", "t-acme2"} <= archived_ids(setup), what="the other tenant's sessions archived")
        # Tried again and again (once idle for claim_idle_ms), never dead-lettered.
        wait_until(
            lambda: (REGISTRY.get_sample_value("facepay_archive_held_sessions_total", {"tenant": "newco"}) or 0) >= 4,
            what="newco's session held, and retried",
        )
        assert archived_ids(setup, tenant="newco") == set()
        assert any(r.levelname == "ERROR" and getattr(r, "tenant", "") == "newco" for r in caplog.records)
        assert pending(setup, "decision-records") == 1 and pending(setup, "frames") == 4  # 3 frames + end
        assert client.xlen(setup.key("dead")) == 0
        # Visible without the logs: a gauge per stage, reason and tenant (never per session),
        # and the readiness probe's body -- still 200: the other tenants are archived.
        wait_until(lambda: held_entries("newco") == 1, what="the held session counted on the gauge")
        assert (held_for_s("newco") or 0) > 0
        status, body = readiness(probes.port)
        assert status == 200 and body["ok"] and "newco" in body["reason"], body
        assert body["deferred"] == [
            {
                "stage": "archiver",
                "reason": "no_archive_key",
                "scope": "newco",
                "entries": 1,
                "oldest_s": body["deferred"][0]["oldest_s"],
            }
        ]
        for stream in ("frames", "faces", "aligned", "posed"):  # the safe trim keeps them: no retention, bound 1
            client.eval(_TRIM_SAFELY, 1, setup.key(stream), int(time.time() * 1000), 1, "0")
        assert client.xlen(setup.key("frames")) >= 4

        keys_file = Path(setup.archive_keys_file)  # the operator adds the tenant's key (the Secret updated)
        keys = ArchiveKeys.from_file(keys_file)
        ArchiveKeys(keys.signing_key, {**keys.tenants, "newco": TenantKeys("k1", {"k1": bytes(range(32))})}).write(
            keys_file
        )
        wait_until(
            lambda: "t-new" in archived_ids(setup, tenant="newco"),
            what="newco's session archived once its key is added",
        )
        wait_until(
            lambda: all(pending(setup, s) == 0 for s in ("frames", "faces", "aligned", "posed", "decision-records")),
            what="every entry acknowledged",
        )
        wait_until(lambda: not held_entries("newco"), what="the gauge cleared once the session is archived")
        status, body = readiness(probes.port)
        assert (status, body["reason"], body["deferred"]) == (200, "ready", [])
        probes.close()
    now = datetime.now(UTC)
    store = reader(setup)
    (ref,) = store.list_sessions("newco", STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    assert [f.image for f in store.read(ref.key).frames] == photos[:3]
    assert store.verify("newco", STORE, now - timedelta(hours=1), now + timedelta(hours=1)).ok
