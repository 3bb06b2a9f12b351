"""The archiver on partitioned streams on a real local Valkey Cluster (3 primaries), with the
embedded SeaweedFS as the archive: sessions flow from a camera-like source through model-less
stages shaped like the real ones (each writes its stage's message type, signed with that stage's
key, to the session's partition) to a once-only decision, and the archiver, with its own ACL
user, archives each session complete with its frames and lets go of every entry.

    source → {ns}:{pNN}:frames → detector → faces → aligner → aligned → pose → posed → decide
    → {ns}:{pNN}:decisions (the signed event, for backends)
    + {ns}:{pNN}:decision-records (in the same once-only write) → archiver (tapping frames, faces,
      aligned, posed in every partition)
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facepay import keys
from facepay.archive import ArchiveKeys, ArchiveSettings, ArchiveStore, EmbeddedS3
from facepay.config import Settings
from facepay.messages import (
    FIELD,
    AlignedMsg,
    DecisionMsg,
    FaceMsg,
    FrameMsg,
    FrameRef,
    Message,
    PosedMsg,
    SessionEndMsg,
)
from facepay.runtime.embedded_cluster import EmbeddedValkeyCluster
from facepay.runtime.envelope import attest, seal
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import connect
from facepay.runtime.stage import Emit, PipeStage, Stage, session_of
from facepay.runtime.worker import StreamWorker
from facepay.signing import sign
from services.archiver.stage import ArchiverStage
from tests import keysets
from tests.e2e import wait_until

TENANT, STORE, FRAMES, PARTITIONS = "acme", "store-1", 3, 6


def _from(component: str) -> dict[str, frozenset[str]]:
    return {t: frozenset({component}) for t in ("frame", "face", "aligned", "posed", "rejection", "end")}


class Detector(PipeStage):
    name, input, output, accepts, accepts_from = "detector", "frames", "faces", FrameMsg, _from("gateway")

    def handle(self, batch: list) -> list[Message]:
        return [FaceMsg(ref=m.ref, frame_box=(10, 20, 110, 140), score=0.99) for m in batch]


class Aligner(PipeStage):
    name, input, output, accepts, accepts_from = "aligner", "faces", "aligned", FaceMsg, _from("detector")

    def handle(self, batch: list) -> list[Message]:
        return [AlignedMsg(ref=m.ref, landmarks=[[1.0, 2.0]] * 68, ear=(0.3, 0.3)) for m in batch]


class Pose(PipeStage):
    name, input, output, accepts, accepts_from = "pose", "aligned", "posed", AlignedMsg, _from("aligner")

    def handle(self, batch: list) -> list[Message]:
        return [PosedMsg(ref=m.ref, yaw=-3.0, eligible=True) for m in batch]


class Decide(Stage):
    """A recognizer without a model: decides a session once all its frames are posed (its
    state in the session's partition), once only (the runtime's Lua)."""

    name, input, accepts_from = "recognizer", "posed", _from("pose")

    def __init__(self, settings: Settings) -> None:
        self.redis, self.partitions = connect(settings.redis_url), Partitions.of(settings)

    def process(self, batch: list[Message]) -> list[Emit]:
        emits = []
        for message in batch:
            if not isinstance(message, PosedMsg):
                continue
            session = session_of(message)
            seen = self.partitions.session_key(session, "session", session)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(seen, str(message.ref.sequence), 1)
            pipe.hlen(seen)
            pipe.expire(seen, 3600)
            if pipe.execute()[1] >= FRAMES:
                record = decision(message.ref)
                signed = {b"payload": record.payload, b"sig": record.signature.encode(), b"kid": b"k1"}
                emits.append(  # as the recognizer writes it: the event, and beside it the record
                    Emit(
                        "decisions",
                        {**signed, b"store": message.ref.store_id.encode()},
                        once_key=f"decided:{session}",
                        partition_key=session,
                        beside=(Emit("decision-records", record.encode(), partition_key=session),),
                    )
                )
        return emits


def decision(ref: FrameRef) -> DecisionMsg:
    event = {
        "session_id": ref.session_id,
        "store_id": ref.store_id,
        "tenant_id": ref.tenant_id,
        "decision": "approve",
        "user_id": "alice",
        "threshold": 0.6,
        "first_frame_ms": ref.received_ms,
        "decided_at_ms": int(time.time() * 1000),
        "frames_seen": FRAMES,
    }
    signed = sign(event, "cluster-archive-decision-key", "k1")
    scores = [{"sequence": i, "top_user": "alice", "top_score": 0.7} for i in range(FRAMES)]
    return DecisionMsg(
        ref=ref, payload=signed[b"payload"], signature=signed[b"sig"].decode(), key_id="k1", frames=scores
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with EmbeddedValkeyCluster(tmp_path_factory.mktemp("cluster"), primaries=3, namespace="fpa") as started:
        yield started


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with EmbeddedS3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def archive_settings(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    keys_file = tmp_path / "archive-keys.yaml"
    ArchiveKeys.generate([TENANT]).write(keys_file)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials.secret_access_key)
    return {"archive_url": f"{s3.url}/facepay-archive/c{uuid.uuid4().hex[:8]}", "archive_keys_file": str(keys_file)}


def settings_as(cluster: EmbeddedValkeyCluster, component: str, redis_user: str | None = None, **values) -> Settings:
    """`component`'s keys; the admin Redis user unless `redis_user` (a component's ACL user)."""
    url = cluster.url_for(redis_user) if redis_user else cluster.url
    return Settings(
        redis_url=url,
        namespace=cluster.namespace,
        stream_partitions=PARTITIONS,
        batch_size=8,
        batch_wait_ms=10,
        claim_idle_ms=1000,
        archive_gather_grace_s=5.0,
        **keysets.signing_as(component),
        **values,
    )


class Running:
    def __init__(self, workers: list[StreamWorker]) -> None:
        self.workers, self.errors = workers, []
        self.threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in workers]

    def _loop(self, worker: StreamWorker) -> None:
        try:
            worker.stage.start()
            while not worker._stopping:
                worker.run_once()
        except BaseException as exc:  # noqa: BLE001 - surfaced on exit
            self.errors.append(exc)

    def __enter__(self) -> Running:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, f"a worker crashed: {self.errors[0]!r}"


def send_sessions(cluster: EmbeddedValkeyCluster, count: int, images: list[bytes]) -> list[str]:
    """`count` sessions of FRAMES frames and an end marker each, as the gateway writes them."""
    client, partitions = connect(cluster.url), Partitions("fpa", PARTITIONS, tagged=True)
    gateway = keys.load_signer(keysets.signing_as("gateway")["key_file"])
    sessions = [f"c-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    for session_id in sessions:
        now = int(time.time() * 1000)
        messages: list[Message] = [
            FrameMsg(
                ref=attest(
                    FrameRef(session_id, STORE, "cam-1", seq, now - 50, tenant_id=TENANT, received_ms=now),
                    gateway,
                    images[seq],
                ),
                image=images[seq],
            )
            for seq in range(FRAMES)
        ]
        end = attest(FrameRef(session_id, STORE, "cam-1", 0, 0, tenant_id=TENANT, received_ms=now), gateway)
        messages.append(SessionEndMsg(ref=end, frame_count=FRAMES))
        for message in messages:
            stream = partitions.stream("frames", session_of(message))
            client.xadd(stream, seal({FIELD: message.encode()}, stream, gateway))
    return sessions


def archived(settings: Settings) -> dict[str, list[bytes]]:
    store = ArchiveStore.from_settings(ArchiveSettings.from_facepay(settings))
    store.ensure_bucket()
    now = datetime.now(UTC)
    refs = store.list_sessions(TENANT, STORE, now - timedelta(hours=1), now + timedelta(hours=1))
    return {r.session_id: [f.image for f in store.read(r.key).frames] for r in refs}


def archiver_pending(cluster: EmbeddedValkeyCluster) -> int:
    """Entries of every tap and decision-records partition the archiver's group holds or has not read."""
    client, total = connect(cluster.url), 0
    partitions = Partitions("fpa", PARTITIONS, tagged=True)
    for name in ("frames", "faces", "aligned", "posed", "decision-records"):
        for stream in partitions.streams(name):
            for group in client.xinfo_groups(stream) if client.exists(stream) else []:
                if group["name"] in (b"archiver", "archiver"):
                    total += int(group["pending"]) + int(group.get("lag") or 0)
    return total


def test_sessions_on_a_cluster_are_archived_with_their_frames_from_every_partition(cluster, archive_settings):
    images = [f"jpeg-{i}".encode() for i in range(FRAMES)]
    stages = [Detector(), Aligner(), Pose()]
    workers = [StreamWorker(s, settings_as(cluster, s.name), consumer=f"{s.name}-0") for s in stages]
    workers.append(
        StreamWorker(
            Decide(settings_as(cluster, "recognizer")), settings_as(cluster, "recognizer"), consumer="recognizer-0"
        )
    )
    archiver = settings_as(cluster, "archiver", redis_user="archiver", **archive_settings)
    workers.append(StreamWorker(ArchiverStage(archiver), archiver, consumer="archiver-0"))
    with Running(workers):
        sessions = send_sessions(cluster, 8, images)
        wait_until(lambda: set(archived(archiver)) >= set(sessions), 60, "every session archived")
        wait_until(lambda: archiver_pending(cluster) == 0, 30, "every entry let go of by the archiver")
    found = archived(archiver)
    assert all(found[s] == images for s in sessions), "each session with its frames as sent, in order"
    used = {Partitions("fpa", PARTITIONS, tagged=True).index(f"{STORE}/{s}") for s in sessions}
    assert len(used) > 2, "sessions spread over the partitions"
    client = connect(cluster.url)
    assert not any(
        client.exists(
            Partitions("fpa", PARTITIONS, tagged=True).session_key(f"{STORE}/{s}", "archiver", "staged", f"{STORE}/{s}")
        )
        for s in sessions
    ), "the per-session index is gone"
    layout = Partitions("fpa", PARTITIONS, tagged=True)
    events = [f for s in layout.streams("decisions") for _, f in client.xrange(s)]
    assert len(events) == len(sessions) and all(set(f) == {b"payload", b"sig", b"kid", b"store"} for f in events)
    assert sum(client.xlen(s) for s in layout.streams("decision-records")) == len(sessions)
