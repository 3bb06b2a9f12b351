"""The stream-worker runtime: what every stage relies on, tested with a toy stage on real servers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from facepay import keys
from facepay.config import Settings
from facepay.messages import FIELD, FrameMsg, FrameRef, Rejection, SessionEndMsg, decode
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.runtime.envelope import seal
from facepay.runtime.stage import Emit, EntryDeferred, PipeStage, Stage, StageContractError
from facepay.runtime.worker import StreamWorker
from tests.e2e import wait_until


class Upper(PipeStage):
    """Turns a frame's image bytes upper-case; raises on b'boom'."""

    name, input, output, accepts = "upper", "in", "out", FrameMsg
    accepts_from = {t: frozenset({"source"}) for t in ("frame", "rejection", "end")}  # its upstream: "source"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def handle(self, batch):
        self.batches.append(len(batch))
        if any(m.image == b"boom" for m in batch):
            raise RuntimeError("boom")
        return [FrameMsg(ref=m.ref, image=m.image.upper()) for m in batch]


def frame(session: str, seq: int, image: bytes = b"x") -> FrameMsg:
    return FrameMsg(ref=FrameRef(session, "store", "cam", seq, 0), image=image)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    """Keys of the toy stages and of "source", the component that writes their input."""
    folder = tmp_path_factory.mktemp("keys")
    keys.generate(folder, ("source", "upper", "decide", "intruder"))
    return folder


def settings_with_keys(keyset, component: str = "upper", **values) -> Settings:
    return Settings(key_file=str(keyset / f"{component}.key"), trusted_keys_file=str(keyset / "trusted.yaml"), **values)


@pytest.fixture
def settings(valkey, keyset) -> Settings:
    return settings_with_keys(
        keyset,
        redis_url=valkey.url,
        namespace=f"t{uuid.uuid4().hex[:8]}",
        batch_size=8,
        batch_wait_ms=50,
        claim_idle_ms=300,
        max_deliveries=2,
    )


def push(client: redis.Redis, settings: Settings, *messages, signer: str = "source", to: str = "in") -> list[bytes]:
    """XADD each message to stream `to`, signed by `signer` (raw bytes are signed as they are);
    the signer's key is the one next to `settings.trusted_keys_file`."""
    key = keys.load_signer(str(Path(settings.trusted_keys_file).parent / f"{signer}.key"))
    stream = settings.key(to)
    return [
        client.xadd(stream, seal({FIELD: m if isinstance(m, bytes) else m.encode()}, stream, key)) for m in messages
    ]


def outputs(client: redis.Redis, settings: Settings) -> list:
    return [decode(f[FIELD]) for _, f in client.xrange(settings.key("out"))]


def run_until(worker: StreamWorker, condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        worker.run_once()


def pending(client, settings, group="upper") -> int:
    return client.xpending(settings.key("in"), group)["pending"]


def test_batches_are_processed_in_order_and_acknowledged(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    stage, worker = Upper(), None
    worker = StreamWorker(stage, settings, consumer="c1")
    push(client, settings, *[frame("s", i, b"ab%d" % i) for i in range(20)])
    run_until(worker, lambda: len(outputs(client, settings)) == 20)
    assert [m.image for m in outputs(client, settings)] == [b"AB%d" % i for i in range(20)]
    assert max(stage.batches) == 8, "reads are batched up to batch_size"
    assert pending(client, settings) == 0


def test_rejections_and_session_ends_pass_through_unchanged(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Upper(), settings, consumer="c1")
    rejection = Rejection(ref=frame("s", 0).ref, stage="detector", reason="no_face")
    end = SessionEndMsg(ref=frame("s", -1).ref, frame_count=2)
    push(client, settings, rejection, frame("s", 1), end)
    run_until(worker, lambda: len(outputs(client, settings)) == 3)
    assert outputs(client, settings)[0] == rejection and outputs(client, settings)[2] == end


def test_a_malformed_entry_goes_to_dead_letters_and_the_rest_goes_on(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Upper(), settings, consumer="c1")
    import msgpack

    no_ref = msgpack.packb({"v": 1, "t": "frame", "image": b"x"})
    unknown_field = msgpack.packb({"v": 1, "t": "frame", "ref": frame("s", 9).ref.__dict__, "colour": "red"})
    push(client, settings, frame("s", 0), b"\xc1 not msgpack", no_ref, unknown_field, frame("s", 1))
    run_until(worker, lambda: len(outputs(client, settings)) == 2)
    dead = client.xrange(settings.key("dead"))
    assert len(dead) == 3 and {d[1][b"reason"] for d in dead} == {b"malformed"}
    assert pending(client, settings) == 0


def test_an_entry_that_keeps_failing_is_dead_lettered_with_its_error(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Upper(), settings, consumer="c1")
    push(client, settings, frame("s", 0), frame("s", 1, b"boom"), frame("s", 2))
    run_until(worker, lambda: len(client.xrange(settings.key("dead"))) == 1)
    assert [m.ref.sequence for m in outputs(client, settings)] == [0, 2], "the good entries of the batch went on"
    _, dead = client.xrange(settings.key("dead"))[0]
    assert dead[b"reason"] == b"max_deliveries" and b"boom" in dead[b"error"]
    assert pending(client, settings) == 0


class Waiting(Upper):
    """Defers the frames of sessions it is not ready for (as the archiver defers a tenant whose
    archive key is missing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ready: set[str] = set()
        self.deferred = 0

    def handle(self, batch):
        for m in batch:
            if m.ref.session_id not in self.ready:
                self.deferred += 1
                raise EntryDeferred(f"not ready for session {m.ref.session_id}", "not_ready", m.ref.session_id)
        return super().handle(batch)


def test_an_entry_the_stage_defers_stays_pending_uncounted_while_the_others_go_on(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    stage = Waiting()
    stage.ready.add("now")
    worker = StreamWorker(stage, settings, consumer="c1")
    push(client, settings, frame("now", 0), frame("later", 0), frame("now", 1), frame("later", 1))
    run_until(worker, lambda: len(outputs(client, settings)) == 2)
    assert [m.ref.session_id for m in outputs(client, settings)] == ["now", "now"]
    # Tried again and again (once idle for claim_idle_ms), more often than max_deliveries: never
    # counted as a failure, never dead-lettered, still pending.
    run_until(worker, lambda: stage.deferred >= 2 * settings.max_deliveries + 3)
    assert pending(client, settings) == 2
    assert client.xlen(settings.key("dead")) == 0
    assert not any(f.endswith(b":failures") for f in client.hgetall(settings.key("errors", "upper")))
    # Counted per reason and scope (one series, however many entries), shown to /readyz.
    assert deferred_entries("upper", "not_ready", "later") == 2
    assert (deferred_oldest_s("upper", "not_ready", "later") or -1) >= 0
    assert [(d["scope"], d["entries"]) for d in worker.heartbeat.deferred()] == [("later", 2)]
    stage.ready.add("later")  # what it waited for (its tenant's key) has come
    run_until(worker, lambda: len(outputs(client, settings)) == 4)
    assert pending(client, settings) == 0 and client.xlen(settings.key("dead")) == 0
    assert deferred_entries("upper", "not_ready", "later") is None, "the series goes once nothing is deferred"
    assert worker.heartbeat.deferred() == []


def deferred_entries(stage: str, reason: str, scope: str) -> float | None:
    return REGISTRY.get_sample_value("facepay_deferred_entries", {"stage": stage, "reason": reason, "scope": scope})


def deferred_oldest_s(stage: str, reason: str, scope: str) -> float | None:
    labels = {"stage": stage, "reason": reason, "scope": scope}
    return REGISTRY.get_sample_value("facepay_deferred_oldest_seconds", labels)


def test_entries_of_a_dead_consumer_are_reclaimed_by_a_live_one(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    dead_worker = StreamWorker(Upper(), settings, consumer="dead")
    push(client, settings, *[frame("s", i) for i in range(5)])
    dead_worker._ensure_group_once()
    assert len(dead_worker._xreadgroup(5, 100)) == 5  # read, then "crash" before acknowledging
    assert pending(client, settings) == 5
    live = StreamWorker(Upper(), settings, consumer="live")
    run_until(live, lambda: len(outputs(client, settings)) == 5)
    assert pending(client, settings) == 0


def test_once_emits_are_written_once_even_when_redelivered(valkey, settings):
    class Decide(Stage):
        name, input = "decide", "in"
        accepts_from = Upper.accepts_from

        def process(self, batch):
            return [
                Emit("decisions", {b"session": m.ref.session_id.encode()}, once_key=f"decided:{m.ref.session_id}")
                for m in batch
            ]

    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(
        Decide(), settings.replace(key_file=settings.key_file.replace("upper", "decide")), consumer="c1"
    )
    push(client, settings, frame("s1", 0), frame("s1", 1), frame("s2", 0), frame("s1", 0))
    run_until(worker, lambda: client.xlen(settings.key("decisions")) >= 2)
    for _ in range(3):
        worker.run_once()
    sessions = [f[b"session"] for _, f in client.xrange(settings.key("decisions"))]
    assert sorted(sessions) == [b"s1", b"s2"]


def test_the_worker_waits_out_a_server_restart_and_loses_nothing(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = settings_with_keys(
            keyset, redis_url=server.url, namespace="restart", batch_size=4, claim_idle_ms=500
        )
        client = redis.Redis.from_url(server.url)
        worker = StreamWorker(Upper(), settings, consumer="c1")
        push(client, settings, *[frame("s", i) for i in range(4)])
        run_until(worker, lambda: len(outputs(client, settings)) == 4)
        server.kill()  # SIGKILL: only what was fsynced survives (appendfsync always)
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        worker.run_once()  # must not raise while the server is down
        restarter.join()
        push(client, settings, *[frame("s", i) for i in range(4, 8)])
        run_until(worker, lambda: len(outputs(client, settings)) == 8, timeout_s=20)
        assert [m.ref.sequence for m in outputs(client, settings)] == list(range(8))


# ---- authentication (issue 9, Critical 2(b)) -------------------------------------------------
def dead_reasons(client, settings) -> dict[bytes, bytes]:
    return {f[b"entry"]: f[b"reason"] for _, f in client.xrange(settings.key("dead"))}


def test_entries_not_signed_by_the_expected_upstream_are_dead_lettered_unauthenticated(valkey, settings):
    from facepay.runtime import metrics

    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Upper(), settings, consumer="c1")
    stream = settings.key("in")
    unsigned = client.xadd(stream, {FIELD: frame("s", 0).encode()})
    wrong_signer = push(client, settings, frame("s", 1), signer="intruder")[0]
    genuine = client.xrange(stream, min=push(client, settings, frame("s", 2, b"paid"))[0])[0][1]
    tampered = client.xadd(stream, {**genuine, FIELD: frame("s", 2, b"forged").encode()})
    # A genuine entry written again is authentic: replays are the recognizer's to refuse.
    replayed = client.xadd(stream, genuine)
    source_key = keys.load_signer(str(Path(settings.trusted_keys_file).parent / "source.key"))
    copied_from_elsewhere = client.xadd(
        stream, seal({FIELD: frame("s", 3).encode()}, settings.key("other"), source_key)
    )
    refused = [unsigned, wrong_signer, tampered, copied_from_elsewhere]
    before = metrics.UNAUTHENTICATED.labels("upper")._value.get()
    run_until(
        worker, lambda: set(refused) <= set(dead_reasons(client, settings)) and len(outputs(client, settings)) == 2
    )
    assert {dead_reasons(client, settings)[e] for e in refused} == {b"unauthenticated"}
    assert [m.image for m in outputs(client, settings)] == [b"PAID", b"PAID"], "only genuine bodies reach the stage"
    assert replayed not in dead_reasons(client, settings)
    assert metrics.UNAUTHENTICATED.labels("upper")._value.get() - before == 4
    assert pending(client, settings) == 0


def test_what_a_worker_writes_is_signed_with_its_own_key(valkey, settings):
    from facepay.runtime.envelope import open_entry

    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Upper(), settings, consumer="c1")
    push(client, settings, frame("s", 0))
    run_until(worker, lambda: len(outputs(client, settings)) == 1)
    ((_, fields),) = client.xrange(settings.key("out"))
    signer, body = open_entry(fields, settings.key("out"), keys.load_trusted(settings.trusted_keys_file), {"upper"})
    assert signer == "upper" and decode(body).image == b"X"


def test_a_worker_without_its_key_file_refuses_to_start_and_names_the_command(valkey, settings, tmp_path):
    with pytest.raises(keys.KeyFileError, match="facepay keys generate"):
        StreamWorker(Upper(), settings.replace(key_file=""))
    with pytest.raises(keys.KeyFileError, match="facepay keys generate"):
        StreamWorker(Upper(), settings.replace(key_file=str(tmp_path / "missing.key")))
    with pytest.raises(keys.KeyFileError, match="is the key of 'source'"):
        StreamWorker(Upper(), settings.replace(key_file=settings.key_file.replace("upper", "source")))


def test_a_once_key_outlives_the_frame_age_bound(valkey, settings):
    """A replayed, genuinely signed frame is either older than max_frame_age_s (refused by the
    recognizer) or meets its session's decided key: the key must live at least that long."""

    class Decide(Stage):
        name, input, accepts_from = "decide", "in", Upper.accepts_from

        def process(self, batch):
            return [Emit("decisions", {b"session": b"s"}, once_key="decided:s") for _ in batch]

    short = settings.replace(
        key_file=settings.key_file.replace("upper", "decide"), stream_retention_s=60, max_frame_age_s=7200
    )
    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Decide(), short, consumer="c1")
    push(client, short, frame("s", 0))
    run_until(worker, lambda: client.exists(short.key("decided:s")))
    assert client.ttl(short.key("decided:s")) > 7000


class Miscounting(PipeStage):
    """Breaks the one-result-per-input contract: returns `results_per_batch(n)` results for n inputs."""

    name, input, output, accepts = "miscounting", "in", "out", FrameMsg

    def __init__(self, results_per_batch) -> None:
        self.results_per_batch = results_per_batch

    def handle(self, batch):
        return [FrameMsg(ref=batch[0].ref, image=b"r") for _ in range(self.results_per_batch(len(batch)))]


@pytest.mark.parametrize(
    "results_per_batch, returned", [(lambda n: n - 1, "2 results for 3"), (lambda n: n + 1, "4 results for 3")]
)
def test_a_stage_returning_other_than_one_result_per_input_fails_naming_the_stage(results_per_batch, returned):
    batch = [
        frame("s", 0),
        Rejection(ref=frame("s", 1).ref, stage="detector", reason="no_face"),
        frame("s", 2),
        frame("s", 3),
    ]
    with pytest.raises(StageContractError) as failure:
        Miscounting(results_per_batch).process(batch)
    assert "miscounting" in str(failure.value) and returned in str(failure.value)


def test_an_entry_reclaimed_from_a_dead_consumer_is_verified_before_it_is_processed(valkey, settings):
    """A forged entry that a consumer read and died on must not be processed unverified by the
    replica that reclaims it: it is dead-lettered as unauthenticated, like on a first read."""
    client = redis.Redis.from_url(valkey.url)
    stage = Upper()
    worker = StreamWorker(stage, settings, consumer="c1")
    worker._ensure_group_once()
    push(client, settings, frame("s", 0, b"forged"), signer="intruder")
    client.xreadgroup("upper", "died", {settings.key("in"): ">"}, count=10)  # read, then the consumer died
    dead = settings.key("dead")
    run_until(worker, lambda: client.xlen(dead) == 1 or outputs(client, settings))
    assert outputs(client, settings) == [], "the reclaimed forgery was processed"
    ((_, letter),) = client.xrange(dead)
    assert letter[b"reason"] == b"unauthenticated"
    assert pending(client, settings) == 0


# ---- health probes (issue 13): /livez follows the loop, /readyz Redis too --------------------
def probe(port: int, path: str) -> int:
    """The HTTP status a kubelet's probe of `path` gets; 0 while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code
    except urllib.error.URLError:
        return 0


@contextlib.contextmanager
def running(worker: StreamWorker):
    """The worker's own run() (start-up, probes, loop) in a thread, stopped on leaving."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(20)


def heartbeat_age(stage: str) -> float:
    return REGISTRY.get_sample_value("facepay_worker_heartbeat_age_seconds", {"stage": stage})


def test_readiness_fails_while_redis_is_down_and_comes_back_with_it_liveness_holds(tmp_path, keyset):
    with EmbeddedValkey(tmp_path / "vk") as server:
        port = free_port()
        settings = settings_with_keys(keyset, redis_url=server.url, namespace="probes", health_port=port)
        with running(StreamWorker(Upper(), settings, consumer="c1")):
            wait_until(lambda: probe(port, "/readyz") == 200, 20, "ready")
            assert probe(port, "/startupz") == 200 and probe(port, "/livez") == 200
            server.kill()
            wait_until(lambda: probe(port, "/readyz") == 503, 20, "not ready while redis is down")
            assert probe(port, "/livez") == 200, "waiting out an outage is not being stuck: no restart for it"
            server.start()
            wait_until(lambda: probe(port, "/readyz") == 200, 20, "ready again once redis answers")
            assert probe(port, "/nope") == 404


class Hanging(Upper):
    """A stage whose handle() hangs until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def handle(self, batch):
        self.entered.set()
        self.release.wait(30)
        return super().handle(batch)


def test_a_stage_stuck_in_handle_fails_liveness_and_the_heartbeat_gauge_shows_it(valkey, settings):
    port, stage = free_port(), Hanging()
    settings = settings.replace(health_port=port, health_stale_s=2.0)
    with running(StreamWorker(stage, settings, consumer="c1")):
        wait_until(lambda: probe(port, "/livez") == 200 and probe(port, "/readyz") == 200, 20, "live and ready")
        assert heartbeat_age("upper") < 2.0
        push(redis.Redis.from_url(valkey.url), settings, frame("s", 0))
        assert stage.entered.wait(20)
        wait_until(lambda: probe(port, "/livez") == 503, 20, "liveness fails once the loop stops turning")
        assert probe(port, "/readyz") == 503 and heartbeat_age("upper") > 2.0
        stage.release.set()
        wait_until(lambda: probe(port, "/livez") == 200, 20, "live again once the loop turns")


def test_free_ports_handed_out_close_together_are_all_different(tmp_path, monkeypatch):
    """A pipeline picks a port per server before any of them binds: a port handed out twice made
    a worker die with 'Address already in use' (seen once in a full run)."""
    from facepay.runtime import embedded

    monkeypatch.setattr(embedded, "_HANDED_OUT_FILE", tmp_path / "ports.json")  # not the machine's record
    ports = [embedded.free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_free_ports_handed_out_by_two_processes_at_once_are_all_different(tmp_path):
    """Two supervisors on one machine (two test workers, a demo beside a test run) choose ports
    at the same time: one must not start a server on a port the other has just chosen."""
    draw = (
        "import sys; from pathlib import Path; from facepay.runtime import embedded\n"
        "embedded._HANDED_OUT_FILE = Path(sys.argv[1])  # the test's record, not the machine's\n"
        "print(*[embedded.free_port() for _ in range(300)])"
    )
    record = str(tmp_path / "ports.json")
    drawing = [
        subprocess.Popen([sys.executable, "-c", draw, record], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    first, second = ({int(p) for p in d.communicate(timeout=60)[0].split()} for d in drawing)
    assert len(first) == len(second) == 300
    assert not first & second
