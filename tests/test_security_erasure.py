"""Issue 9, item 11: a deleted user leaves no biometric data behind, and images do not linger.

Face images and chips live in Redis only while a stage needs them: dead letters keep an entry's
metadata and error, not its bytes; an enrollment's entries leave every stream as soon as the
next stage has them; an enrollment's session state (embeddings, chips) goes when the enrollment
is decided; a decline names no user in its session state or its log line. The embedded Valkey's
files are readable by their owner only. What stays — the signed decisions, for audit — holds no
biometric data.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path

import pytest
import redis

from facepay import keys
from facepay.config import SessionPolicy, Settings
from facepay.messages import FIELD, FrameMsg, FrameRef, decode
from facepay.runtime.embedded import EmbeddedValkey
from facepay.runtime.envelope import seal
from facepay.runtime.stage import PipeStage
from facepay.runtime.worker import StreamWorker
from tests.keysets import signing_as
from tests.test_runtime import push


class Passthrough(PipeStage):
    """Passes frames on; fails on images that start with b'BOOM'."""

    name, input, output, accepts = "detector", "frames", "faces", FrameMsg
    accepts_from = {"frame": frozenset({"gateway"})}  # its input is the gateway's, as the real detector's

    def handle(self, batch):
        if any(m.image.startswith(b"BOOM") for m in batch):
            raise RuntimeError("cannot decode this image")
        return batch


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def settings(valkey) -> Settings:
    return Settings(
        redis_url=valkey.url,
        namespace=f"er{uuid.uuid4().hex[:8]}",
        batch_size=8,
        batch_wait_ms=20,
        claim_idle_ms=200,
        max_deliveries=1,
        **signing_as("detector"),
    )


def from_gateway(client: redis.Redis, settings: Settings, *messages) -> list[bytes]:
    """Genuine camera frames: written to the detector's input signed by the gateway."""
    return push(client, settings, *messages, signer="gateway", to="frames")


def run_until(worker: StreamWorker, condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        worker.run_once()


def test_a_dead_letter_keeps_the_entrys_metadata_and_error_not_its_image(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    image = b"BOOM" + os.urandom(4096)
    ref = FrameRef("sess-dl", "store", "cam", 7, 0)
    from_gateway(client, settings, FrameMsg(ref=ref, image=image))
    worker = StreamWorker(Passthrough(), settings, consumer="c1")
    run_until(worker, lambda: client.xlen(settings.key("dead")) == 1)
    [(_, dead)] = client.xrange(settings.key("dead"))
    everything = b"".join(dead.values())
    assert image[4:] not in everything and image[4:200] not in everything, "no image bytes in the dead letter"
    assert dead[b"reason"] == b"max_deliveries" and b"cannot decode this image" in dead[b"error"]
    meta = json.loads(dead[b"ref"])
    assert meta["session_id"] == "sess-dl" and meta["sequence"] == 7 and dead[b"type"] == b"frame"
    assert dead[b"sha256"] == hashlib.sha256(client_field_bytes(ref, image)).hexdigest().encode()


def client_field_bytes(ref: FrameRef, image: bytes) -> bytes:
    return FrameMsg(ref=ref, image=image).encode()


def test_a_malformed_entry_is_dead_lettered_without_its_bytes(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    junk = b"\xc1" + os.urandom(2048)
    # Signed by the gateway, so it is refused as malformed (an unsigned one is unauthenticated)
    gateway = keys.load_signer(signing_as("gateway")["key_file"])
    written = seal({FIELD: junk, b"extra": b"field"}, settings.key("frames"), gateway)
    client.xadd(settings.key("frames"), written)
    worker = StreamWorker(Passthrough(), settings, consumer="c1")
    run_until(worker, lambda: client.xlen(settings.key("dead")) == 1)
    [(_, dead)] = client.xrange(settings.key("dead"))
    assert junk[1:100] not in b"".join(dead.values())
    assert dead[b"reason"] == b"malformed" and int(dead[b"bytes"]) == sum(len(v) for v in written.values())


def test_enrollment_entries_leave_each_stream_once_the_next_stage_has_them(valkey, settings):
    client = redis.Redis.from_url(valkey.url)
    enroll = FrameRef("enr-1", "", "operator", 0, 0, purpose="enroll", user_id="alice")
    pay = FrameRef("pay-1", "store", "cam", 0, 0)
    from_gateway(client, settings, FrameMsg(ref=enroll, image=b"alice's photo"), FrameMsg(ref=pay, image=b"payer"))
    worker = StreamWorker(Passthrough(), settings, consumer="c1")
    run_until(worker, lambda: client.xlen(settings.key("faces")) == 2)
    left = [decode(f[FIELD]).ref.session_id for _, f in client.xrange(settings.key("frames"))]
    assert left == ["pay-1"], "the enrollment photo is gone from the input stream; payment history stays"


# ---- the whole path: enrol, pay, delete ----------------------------------------------------
def _all_stream_bytes(client: redis.Redis, settings: Settings) -> dict[str, bytes]:
    out = {}
    for stream in ("frames", "faces", "aligned", "posed", "enrollments", "admin-replies", "dead", "decisions"):
        out[stream] = b"".join(b"".join(f.values()) for _, f in client.xrange(settings.key(stream)))
    return out


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow
def test_a_deleted_user_leaves_no_biometric_data_in_redis(faces, tmp_path):
    from facepay.app.admin import call
    from facepay.contract import pb
    from tests.e2e import Backend, camera, enroll, new_session, start_pipeline

    people = {n: p for n, p in faces.identities().items() if len(p) >= 3}
    name, photos = next(iter(people.items()))
    # Blink required: photos of the user decline for liveness, with frames that named the user.
    pipeline = start_pipeline(tmp_path, SessionPolicy(session_timeout_s=3.0))
    try:
        client = redis.Redis.from_url(pipeline.settings.redis_url)
        s = pipeline.settings
        assert (
            enroll(pipeline, name, [photos[0].read_bytes(), photos[1].read_bytes()]).status
            == pb.EnrollResponse.ENROLLED
        )
        backend = Backend(pipeline, "store-1")
        session = new_session()
        cam = camera(pipeline, "cam-1")
        cam.stream_session(session, [photos[2].read_bytes()] * 3)
        event = backend.wait_for([session])[session]
        backend.close()
        cam.close()
        assert event.decision == pb.DECLINE and event.user_id == ""

        def session_hashes() -> list[bytes]:
            return list(client.scan_iter(match=s.key("session", "*")))

        _wait(lambda: not session_hashes(), 30, "session state (embeddings, chips, names) erased once decided")
        decline_log = [
            json.loads(line)
            for line in (tmp_path / "recognizer-0.log").read_text().splitlines()
            if line.startswith("{")
        ]
        decisions = [e for e in decline_log if e.get("msg") == "decision" and e.get("session_id") == session]
        assert decisions and name not in json.dumps(decisions), "a decline's log line names no user"

        photo_chunk = photos[0].read_bytes()[2000:2048]

        def aof_files() -> list[Path]:
            return [p for p in (pipeline.workdir / "valkey").rglob("*") if p.is_file() and ".aof" in p.name]

        assert any(photo_chunk in p.read_bytes() for p in aof_files()), "the enrollment photo went through the AOF"
        rewrites_before = client.info("persistence")["aof_rewrites"]

        operator = s.replace(redis_url=pipeline.valkey.url_for("operator"))  # as `facepay users delete` runs
        call(operator, "delete_user", user_id=name)
        _wait(
            lambda: (
                client.info("persistence")["aof_rewrites"] > rewrites_before
                and not client.info("persistence")["aof_rewrite_in_progress"]
            ),
            30,
            "the AOF is rewritten after an erasure",
        )
        assert not any(photo_chunk in p.read_bytes() for p in aof_files()), "the erased photo left the server's files"
        streams = _all_stream_bytes(client, s)
        for stream in ("frames", "faces", "aligned", "posed"):
            assert all(decode(f[FIELD]).ref.purpose != "enroll" for _, f in client.xrange(s.key(stream))), (
                f"an enrollment photo or chip is still in {stream}"
            )
        assert name.encode() not in streams["enrollments"], "the enrollment results naming the user are erased"
        assert name.encode() not in streams["dead"]
        assert not client.exists(s.key("faces", name))
        assert not list(client.scan_iter(match=s.key("limits", "user", name, "*")))
        for path in (pipeline.workdir / "valkey").rglob("*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} readable by others"
    finally:
        pipeline.stop()


def test_face_images_leave_the_stage_streams_after_the_image_retention(valkey, settings):
    """Payment frames and chips are kept for `image_retention_s` (debugging, replay), not the
    week of decision history: a payer's face is not stored for longer than it is useful."""
    client = redis.Redis.from_url(valkey.url)
    settings = settings.replace(image_retention_s=1)
    from_gateway(
        client, settings, *[FrameMsg(ref=FrameRef("pay", "store", "cam", i, 0), image=b"face") for i in range(5)]
    )
    worker = StreamWorker(Passthrough(), settings, consumer="c1")
    run_until(worker, lambda: client.xlen(settings.key("faces")) == 5)
    time.sleep(1.1)
    worker._last_trim = 0.0  # the next turn trims
    run_until(worker, lambda: client.xlen(settings.key("frames")) == 0, timeout_s=5)
