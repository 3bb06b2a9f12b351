"""Partitioned streams on a real local Valkey Cluster (3 primaries, a replica each), with the
runtime's real workers and two toy stages standing in for the models, so that what is tested
is the Redis side: every acknowledged frame reaches a decision, every session is decided once,
through a primary's SIGKILL and through a slot migration, with traffic flowing.

    source (like the gateway) → {ns}:{pNN}:frames → relay → {ns}:{pNN}:faces → decide
    → {ns}:{pNN}:decisions (once per session: the runtime's Lua, with {ns}:{pNN}:decided:…)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import msgpack
import pytest
import redis

from facepay import keys, redis_acl
from facepay.app.stages import create_stage
from facepay.config import Settings
from facepay.decisions import DecisionReader, consume_partitions
from facepay.messages import FIELD, FrameMsg, FrameRef
from facepay.runtime.embedded_cluster import EmbeddedValkeyCluster
from facepay.runtime.envelope import seal
from facepay.runtime.partitions import Partitions
from facepay.runtime.passthrough import COMPONENTS, Decide, Relay
from facepay.runtime.redis_conn import (
    REDIS_ERRORS,
    backpressure_kind,
    connect,
    durable_xadd,
    is_cluster,
)
from facepay.runtime.stage import session_of
from facepay.runtime.worker import StreamWorker
from facepay.signing import sign
from services.recognizer.erasure import erase_user_traces
from tests.e2e import wait_until

FRAMES = 3  # per session
PARTITIONS = 8


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keys.generate(folder, COMPONENTS)
    return folder


def settings_for(keyset, cluster: EmbeddedValkeyCluster, component: str, **values) -> Settings:
    return Settings(
        key_file=str(keyset / f"{component}.key"),
        trusted_keys_file=str(keyset / "trusted.yaml"),
        redis_url=cluster.url,
        namespace=cluster.namespace,
        stream_partitions=PARTITIONS,
        batch_size=8,
        batch_wait_ms=10,
        claim_idle_ms=1000,
        **values,
    )


class Workers:
    """The toy stages' workers, each looping in a thread as `facepay worker` would."""

    def __init__(self, keyset, cluster: EmbeddedValkeyCluster, **values) -> None:
        self.workers = [
            StreamWorker(Relay(), settings_for(keyset, cluster, "relay", **values), consumer="relay-0"),
            StreamWorker(Relay(), settings_for(keyset, cluster, "relay", **values), consumer="relay-1"),
            StreamWorker(
                Decide(settings_for(keyset, cluster, "decide"), FRAMES),
                settings_for(keyset, cluster, "decide", **values),
                consumer="decide-0",
            ),
        ]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in self.workers]

    def _loop(self, worker: StreamWorker) -> None:
        try:
            while not worker._stopping:
                worker.run_once()
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop(): a worker must never crash on a failover
            self.errors.append(exc)

    def __enter__(self) -> Workers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, f"a worker crashed: {self.errors[0]!r}"


class Source:
    """Sends sessions' frames like the gateway: each to its partition's frames stream, counted
    only once Redis acknowledged it (with redis_wait_replicas, once a replica has it too);
    refused writes are retried, as a camera retries an UNAVAILABLE frame."""

    def __init__(self, keyset, cluster: EmbeddedValkeyCluster, **values) -> None:
        self.settings = settings_for(keyset, cluster, "source", **values)
        self.client = connect(self.settings.redis_url)
        self.partitions = Partitions.of(self.settings)
        self.signer = keys.load_signer(str(keyset / "source.key"))
        self.acknowledged: dict[str, set[int]] = {}

    def send(self, session_id: str, sequence: int, timeout_s: float = 60.0) -> None:
        message = FrameMsg(ref=FrameRef(session_id, "store-1", "cam-1", sequence, 0), image=b"tiny")
        stream = self.partitions.stream("frames", session_of(message))
        fields = seal({FIELD: message.encode()}, stream, self.signer)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                durable_xadd(self.client, stream, fields, self.settings)
                break
            except REDIS_ERRORS as exc:
                if backpressure_kind(exc) is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.acknowledged.setdefault(session_id, set()).add(sequence)

    def sessions(self, count: int, during=None) -> list[str]:
        """`count` sessions of FRAMES frames, interleaved; `during()` runs halfway through."""
        ids = [f"s-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        for sequence in range(FRAMES):
            for i, session in enumerate(ids):
                if during and sequence == 1 and i == count // 2:
                    during()
                self.send(session, sequence)
        return ids


def decisions(client, partitions: Partitions) -> list[dict]:
    """Every decision entry of every partition."""
    found = []
    for stream in partitions.streams("decisions"):
        found += [json.loads(f[b"payload"]) for _, f in client.xrange(stream)]
    return found


def assert_decided_once(client, partitions: Partitions, sessions: list[str], timeout_s: float = 60.0) -> None:
    wait_until(
        lambda: {d["session_id"] for d in decisions(client, partitions)} >= set(sessions),
        timeout_s,
        "every session decided",
    )
    counts: dict[str, int] = {}
    for decision in decisions(client, partitions):
        counts[decision["session_id"]] = counts.get(decision["session_id"], 0) + 1
    twice = {s: n for s, n in counts.items() if s in sessions and n != 1}
    assert not twice, f"sessions decided more than once: {twice}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with EmbeddedValkeyCluster(
        tmp_path_factory.mktemp("cluster"), primaries=3, replicas_per_primary=1, namespace="fpc"
    ) as started:
        yield started


def test_a_session_keys_share_one_slot_and_partitions_spread_over_the_primaries(cluster):
    partitions = Partitions("fpc", PARTITIONS, tagged=True)
    session = "store-1/pos-42"
    same_slot = {partitions.stream(name, session) for name in ("frames", "faces", "aligned", "posed", "decisions")}
    same_slot |= {
        partitions.session_key(session, "session", session),
        partitions.session_key(session, "decided", session),
        partitions.session_key(session, "sessions", "open"),
        partitions.session_key(session, "gateway-session", session),
    }
    client = cluster.cluster_client()
    assert is_cluster(client)
    assert len({client.keyslot(key) for key in same_slot}) == 1
    owners = {cluster.primary_of(stream).port for stream in partitions.streams("frames")}
    assert len(owners) == 3, "8 partitions land on every one of the 3 primaries"
    assert Partitions("fp", 1, tagged=False).stream("frames", session) == "fp:frames", "one partition: today's names"


@pytest.mark.slow
def test_sessions_flow_through_partitions_on_a_cluster_and_are_decided_once(cluster, keyset):
    client = cluster.cluster_client()
    source = Source(keyset, cluster)
    with Workers(keyset, cluster):
        sessions = source.sessions(24)
        assert_decided_once(client, source.partitions, sessions)
    used = {source.partitions.index(f"store-1/{s}") for s in sessions}
    assert len(used) > PARTITIONS // 2, "sessions spread over the partitions"


@pytest.mark.slow
def test_a_dead_replica_s_entries_in_every_partition_are_taken_over(cluster, keyset):
    """A relay replica reads frames from many partitions and dies before acknowledging any:
    the live replicas reclaim them (XAUTOCLAIM on each partition) and every session is decided."""
    client = cluster.cluster_client()
    source = Source(keyset, cluster)
    sessions = source.sessions(16)
    dead = StreamWorker(Relay(), settings_for(keyset, cluster, "relay"), consumer="relay-dead")
    dead._ensure_group_once()
    held = dead._xreadgroup(64, 100)
    assert len({entry.stream for entry in held}) > 1, "it held entries of several partitions"
    with Workers(keyset, cluster):
        assert_decided_once(client, source.partitions, sessions)


@pytest.mark.slow
def test_a_slot_migrating_during_traffic_changes_nothing(cluster, keyset):
    client = cluster.cluster_client()
    source = Source(keyset, cluster)
    moved = source.partitions.streams("frames")[3]

    def reshard() -> None:
        migrate_slot(cluster, client.keyslot(moved))

    with Workers(keyset, cluster):
        before = cluster.primary_of(moved).port
        sessions = source.sessions(24, during=reshard)
        assert_decided_once(client, source.partitions, sessions)
    assert cluster.primary_of(moved).port != before, "the partition's slot moved to another primary"


@pytest.mark.slow
def test_a_primary_killed_and_its_replica_promoted_loses_no_acknowledged_frame(tmp_path, keyset):
    with EmbeddedValkeyCluster(
        tmp_path / "cluster", primaries=3, replicas_per_primary=1, namespace="fpc", node_timeout_ms=3000
    ) as cluster:
        # Every acknowledgement (the source's frames, the workers' commits) waits for a replica.
        source = Source(keyset, cluster, redis_wait_replicas=1)
        victim_stream = source.partitions.streams("frames")[0]
        killed = []

        def kill_and_promote() -> None:
            primary = cluster.primary_of(victim_stream)
            replica = cluster.replicas_of(primary)[0]
            primary.kill()  # SIGKILL
            cluster.client(replica).execute_command("CLUSTER FAILOVER", "TAKEOVER")
            wait_until(
                lambda: cluster.client(replica).info("replication")["role"] == "master", 10, "the replica promoted"
            )
            killed.append((primary.port, replica.port))
            # Back from its AOF, it learns it was replaced and follows the new primary: the
            # shard has a replica again, so acknowledgements (WAIT 1) resume.
            primary.start()

        with Workers(keyset, cluster, redis_wait_replicas=1, redis_wait_timeout_ms=500) as workers:
            sessions = source.sessions(24, during=kill_and_promote)
            assert_decided_once(connect(cluster.url), source.partitions, sessions, timeout_s=90)
        ((old, promoted),) = killed
        # The promoted replica serves the shard, unless a node of this loaded machine missed the
        # node timeout since and the cluster failed back to the old primary, which rejoined as
        # its replica: either way one of the shard's own two nodes serves it (no slot lost).
        assert cluster.primary_of(victim_stream).port in (promoted, old)
        assert sum(len(s) for s in source.acknowledged.values()) == len(sessions) * FRAMES
        assert not workers.errors


def migrate_slot(cluster: EmbeddedValkeyCluster, slot: int) -> None:
    """Move one slot to another primary as valkey-cli --cluster reshard does: IMPORTING on the
    target, MIGRATING on the source, MIGRATE the keys in batches, then SETSLOT NODE everywhere."""
    source = next(n for n in cluster.live() if _serves(cluster, n, slot))
    target = next(n for n in cluster.live() if n is not source and _is_primary(cluster, n))
    src, dst = cluster.client(source), cluster.client(target)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    password = cluster.passwords["admin"]
    while keys_left := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command(
            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "AUTH2", "admin", password, "KEYS", *keys_left
        )
    for node in (target, source, *[n for n in cluster.live() if n not in (source, target)]):
        with contextlib.suppress(redis.ResponseError):  # a replica: it learns from its primary
            cluster.client(node).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def _serves(cluster, node, slot: int) -> bool:
    table = cluster._nodes_table(node)
    me = next(n for n in table.values() if "myself" in n["flags"])
    return "master" in me["flags"] and any(int(r[0]) <= slot <= int(r[-1]) for r in me["slots"])


def _is_primary(cluster, node) -> bool:
    table = cluster._nodes_table(node)
    return "master" in next(n for n in table.values() if "myself" in n["flags"])["flags"]


def test_a_backend_group_spanning_the_partitions_gets_each_decision_once(cluster):
    """Two replicas of a backend share the partitions through one consumer group per partition
    stream (`consume_partitions`): together they see every decision, none twice."""
    client = cluster.cluster_client()
    layout = Partitions(cluster.namespace, PARTITIONS, tagged=True)
    key, key_id = "k" * 32, "k1"
    group = f"backend-{uuid.uuid4().hex[:6]}"
    got: list[str] = []
    stop = threading.Event()

    def replica(name: str) -> None:
        reader = connect(cluster.url)
        for stream, entry_id, event in consume_partitions(
            reader, layout, group, name, {key_id: key}, "store-1", max_age_s=None, block_ms=100, stop=stop
        ):
            got.append(event["session_id"])
            reader.xack(stream, group, entry_id)

    threads = [threading.Thread(target=replica, args=(f"b-{i}",), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    sessions = [f"d-{uuid.uuid4().hex[:8]}" for _ in range(40)]
    try:
        wait_until(
            lambda: all(has_group(client, s, group) for s in layout.streams("decisions")),
            10,
            "the group on every partition",
        )
        for session in sessions:
            event = {
                "session_id": session,
                "store_id": "store-1",
                "event_id": f"fpc:store-1/{session}",
                "decided_at_ms": int(time.time() * 1000),
            }
            client.xadd(layout.stream("decisions", f"store-1/{session}"), sign(event, key, key_id))
        wait_until(lambda: len(got) >= len(sessions), 30, "every decision consumed")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert sorted(got) == sorted(sessions), "each decision once, across the partitions and the replicas"


def has_group(client, stream: str, group: str) -> bool:
    try:
        return any(g["name"] in (group, group.encode()) for g in client.xinfo_groups(stream))
    except redis.ResponseError:  # no stream yet
        return False


def test_every_component_user_may_use_the_partitioned_names_of_its_keys():
    """ACL rules carry each per-session key in every partition's hash tag, and the cluster's
    discovery commands; global keys stay as they were."""
    gateway = " ".join(redis_acl.rules("gateway", "fp"))
    assert "~fp:frames" in gateway and "~fp:{p*}:frames" in gateway
    assert "%R~fp:{p*}:decided:*" in gateway
    recognizer = " ".join(redis_acl.rules("recognizer", "fp"))
    assert "~fp:{p*}:session:*" in recognizer and "~fp:{p*}:sessions:open" in recognizer
    assert "~fp:{p*}:thresholds" not in recognizer, "global keys are not partitioned"
    assert "+cluster|slots" in redis_acl.user_line("keda", "fp", "x") and "+asking" in redis_acl.user_line(
        "keda", "fp", "x"
    )


def test_the_archiver_taps_every_partition_and_may_use_its_partitioned_index_keys():
    """It used to refuse partitioned streams; it archives on a cluster (tests/test_cluster_archive.py)."""
    stage = create_stage("archiver", Settings(stream_partitions=4, namespace="fp"))
    assert sorted(s for s in stage._taps if s.endswith(":frames")) == [f"fp:{{p0{p}}}:frames" for p in range(4)]
    archiver = " ".join(redis_acl.rules("archiver", "fp"))
    assert "~fp:{p*}:archiver:*" in archiver and "~fp:archiver:*" in archiver, "partitioned index, global turns"


def test_decision_subscribers_read_every_partition_and_resume_missing_nothing(cluster):
    """The gateway's reader (SubscribeDecisions): a cursor per partition, each entry once while
    subscribed; resumed after an entry id, it misses none of what came after (it may repeat a
    little from before: backends drop repeats by event id)."""
    client = cluster.cluster_client()
    layout = Partitions(f"r{uuid.uuid4().hex[:4]}", PARTITIONS, tagged=True)
    reader = DecisionReader(client, layout)  # from now on

    def write(n: int) -> list[tuple[bytes, bytes]]:
        """(entry id, token) of n decisions in random partitions (ids repeat across partitions)."""
        written = []
        for _ in range(n):
            token = uuid.uuid4().hex.encode()
            written.append((client.xadd(layout.stream("decisions", f"store-1/{token.decode()}"), {b"t": token}), token))
        return written

    def read_into(into: list[bytes], subscription: DecisionReader) -> None:
        into.extend(fields[b"t"] for _, fields in subscription.read(block_ms=50))

    first = write(20)
    seen: list[bytes] = []
    wait_until(lambda: read_into(seen, reader) or len(seen) >= 20, 10, "the first 20 decisions")
    assert sorted(seen) == sorted(t for _, t in first), "each once, from every partition"
    later = write(20)
    resumed = DecisionReader(client, layout, after=first[-1][0].decode())
    again: list[bytes] = []
    wait_until(
        lambda: read_into(again, resumed) or {t for _, t in later} <= set(again), 10, "every decision after the cursor"
    )
    assert len(again) == len(set(again)), "no entry twice within one subscription"


def test_erasing_a_user_reaches_every_partition_of_a_cluster(cluster):
    """A deleted user's enrollment session state and results, wherever their partition lives."""
    settings = Settings(redis_url=cluster.url, namespace=f"e{uuid.uuid4().hex[:4]}", stream_partitions=PARTITIONS)
    client, layout = cluster.cluster_client(), Partitions.of(settings)
    for i in range(6):  # enrollments spread over partitions (and primaries)
        session = f"/enroll-{uuid.uuid4().hex[:6]}"
        client.hset(
            layout.session_key(session, "session", session),
            "meta",
            msgpack.packb({"purpose": "enroll", "user_id": "alice" if i % 2 else "bob"}),
        )
        client.xadd(
            layout.stream("enrollments", session), {b"m": msgpack.packb({"user_id": "alice" if i % 2 else "bob"})}
        )
    erased = erase_user_traces(client, settings, "alice")
    assert erased["enrollment_sessions"] == 3 and erased["enrollment_results"] == 3
    left = sum(client.xlen(s) for s in layout.streams("enrollments"))
    assert left == 3, "bob's stay"
