"""The stream-worker runtime: what every stage relies on, tested with a toy stage on real servers."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from facepay.config import Settings
from facepay.messages import FIELD, FrameMsg, FrameRef, Rejection, SessionEndMsg, decode
from facepay.runtime.embedded import EmbeddedValkey
from facepay.runtime.stage import Emit, PipeStage, Stage, StageContractError
from facepay.runtime.worker import StreamWorker


class Upper(PipeStage):
    """Turns a frame's image bytes upper-case; raises on b'boom'."""

    name, input, output, accepts = "upper", "in", "out", FrameMsg

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


@pytest.fixture
def settings(valkey) -> Settings:
    return Settings(redis_url=valkey.url, namespace=f"t{uuid.uuid4().hex[:8]}", batch_size=8, batch_wait_ms=50,
                    claim_idle_ms=300, max_deliveries=2)


def push(client: redis.Redis, settings: Settings, *messages) -> None:
    for m in messages:
        client.xadd(settings.key("in"), {FIELD: m if isinstance(m, bytes) else m.encode()})


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

        def process(self, batch):
            return [Emit("decisions", {b"session": m.ref.session_id.encode()}, once_key=f"decided:{m.ref.session_id}")
                    for m in batch]

    client = redis.Redis.from_url(valkey.url)
    worker = StreamWorker(Decide(), settings, consumer="c1")
    push(client, settings, frame("s1", 0), frame("s1", 1), frame("s2", 0), frame("s1", 0))
    run_until(worker, lambda: client.xlen(settings.key("decisions")) >= 2)
    for _ in range(3):
        worker.run_once()
    sessions = [f[b"session"] for _, f in client.xrange(settings.key("decisions"))]
    assert sorted(sessions) == [b"s1", b"s2"]


def test_the_worker_waits_out_a_server_restart_and_loses_nothing(tmp_path):
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = Settings(redis_url=server.url, namespace="restart", batch_size=4, claim_idle_ms=500)
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


class Miscounting(PipeStage):
    """Breaks the one-result-per-input contract: returns `results_per_batch(n)` results for n inputs."""

    name, input, output, accepts = "miscounting", "in", "out", FrameMsg

    def __init__(self, results_per_batch) -> None:
        self.results_per_batch = results_per_batch

    def handle(self, batch):
        return [FrameMsg(ref=batch[0].ref, image=b"r") for _ in range(self.results_per_batch(len(batch)))]


@pytest.mark.parametrize("results_per_batch, returned", [(lambda n: n - 1, "2 results for 3"),
                                                         (lambda n: n + 1, "4 results for 3")])
def test_a_stage_returning_other_than_one_result_per_input_fails_naming_the_stage(results_per_batch, returned):
    batch = [frame("s", 0), Rejection(ref=frame("s", 1).ref, stage="detector", reason="no_face"), frame("s", 2),
             frame("s", 3)]
    with pytest.raises(StageContractError) as failure:
        Miscounting(results_per_batch).process(batch)
    assert "miscounting" in str(failure.value) and returned in str(failure.value)
