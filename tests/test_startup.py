"""Start-up order in a pod (issue 13): the device first, then Redis and the gallery server waited
for, within a bound, with log lines that say so — never a crash loop on the first refused connection."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
import torch

from facepay import keys
from facepay.app.stages import STAGES, create_stage
from facepay.config import Settings
from facepay.gallery import EdgeGallery, QdrantGallery, wait_until_reachable
from facepay.models.device import DeviceUnavailableError
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.runtime.startup import DependencyUnavailable
from facepay.runtime.worker import StreamWorker
from tests.e2e import wait_until
from tests.keysets import signing_as
from tests.test_runtime import Upper, probe, running, settings_with_keys


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keys.generate(folder, ("source", "upper"))
    return folder


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class GpuUpper(Upper):
    uses_device = True


def closed_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@no_cuda
def test_a_gpu_stage_without_cuda_refuses_to_start_before_it_waits_for_redis(keyset, caplog):
    settings = settings_with_keys(keyset, redis_url=closed_redis_url(), device="cuda", startup_wait_s=60)
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(DeviceUnavailableError, match="FACEPAY_DEVICE=cpu"):
        StreamWorker(GpuUpper(), settings).run()
    assert time.monotonic() - started < 5, "it waited for redis before checking its device"
    assert not any("waiting for redis" in r.getMessage() for r in caplog.records)


def test_the_stages_that_run_models_are_the_ones_whose_device_is_checked():
    uses_device = {name for name in STAGES if create_stage(name, Settings()).uses_device}
    assert uses_device == {"detector", "aligner", "recognizer"}


def worker_process(stage: str, **env: str) -> subprocess.Popen:
    """`facepay worker <stage>` as a pod runs it, with Redis on a port nothing listens on."""
    env = {
        **os.environ,
        "FACEPAY_REDIS_URL": closed_redis_url(),
        "FACEPAY_LOG_FORMAT": "text",
        **env,
        **{f"FACEPAY_{k.upper()}": v for k, v in signing_as(stage).items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "facepay", "worker", stage],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@no_cuda
def test_a_worker_pod_that_cannot_start_exits_with_one_line_saying_why():
    """A GPU pod without its GPU at once, before any connection; a pod whose Redis never comes
    after FACEPAY_STARTUP_WAIT_S. (Both at once: each pays torch's import.)"""
    gpu_without_gpu = worker_process("detector", FACEPAY_DEVICE="cuda")
    redis_never_comes = worker_process("pose", FACEPAY_STARTUP_WAIT_S="1")
    _, gpu_errors = gpu_without_gpu.communicate(timeout=120)
    _, redis_errors = redis_never_comes.communicate(timeout=120)
    assert gpu_without_gpu.returncode == 1
    assert "facepay worker detector: device 'cuda' was asked for but torch sees no CUDA device" in gpu_errors
    assert "Traceback" not in gpu_errors and "waiting for redis" not in gpu_errors
    assert redis_never_comes.returncode == 1
    assert "waiting for redis at redis://127.0.0.1:" in redis_errors
    assert (
        "facepay worker pose: redis at redis://127.0.0.1:" in redis_errors
        and "did not answer within 1 s" in redis_errors
    )
    assert "Traceback" not in redis_errors


def test_a_stage_without_models_starts_without_loading_torch():
    # A pod's start is what a scale-up waits for, and torch alone is ≈1.5 s of CPU to import.
    pose = worker_process("pose", FACEPAY_STARTUP_WAIT_S="0.5", PYTHONPROFILEIMPORTTIME="1")
    _, imports = pose.communicate(timeout=60)
    assert "did not answer within" in imports, imports[-2000:]  # past its stage's set-up, waiting for Redis
    imported = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if line.startswith("import time:")}
    assert "cv2" in imported, "no import was recorded"
    assert "torch" not in imported


def test_a_worker_started_before_redis_waits_for_it_then_becomes_ready(tmp_path, keyset, caplog):
    server, port = EmbeddedValkey(tmp_path / "vk"), free_port()
    settings = settings_with_keys(keyset, redis_url=server.url, namespace="early", health_port=port)
    try:
        with caplog.at_level(logging.INFO), running(StreamWorker(Upper(), settings, consumer="c1")) as worker:
            wait_until(
                lambda: any("waiting for redis at redis://" in r.getMessage() for r in caplog.records),
                20,
                "a log line saying what it waits for",
            )
            assert (probe(port, "/startupz"), probe(port, "/livez"), probe(port, "/readyz")) == (503, 503, 503), (
                "not started: the startup probe holds (and the liveness probe waits for it)"
            )
            server.start()
            wait_until(lambda: probe(port, "/readyz") == 200, 30, "ready once redis answers")
            assert worker.is_alive()
    finally:
        server.stop()


def test_redis_that_never_comes_is_a_clear_error_after_the_bound(keyset):
    settings = settings_with_keys(keyset, redis_url=closed_redis_url(), startup_wait_s=1)
    started = time.monotonic()
    with pytest.raises(
        DependencyUnavailable,
        match=r"redis at redis://127\.0\.0\.1:\d+/0 did not answer within 1 s "
        r"\(FACEPAY_STARTUP_WAIT_S\)",
    ):
        StreamWorker(Upper(), settings).run()
    assert 1 <= time.monotonic() - started < 5


def test_a_qdrant_server_that_never_answers_is_a_clear_error_after_the_bound():
    gallery = QdrantGallery(url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable, match=r"qdrant at http://127\.0\.0\.1:\d+ did not answer within 1 s"):
        wait_until_reachable(gallery, 1.0)
    assert 1 <= time.monotonic() - started < 5
    gallery.close()


def test_an_embedded_gallery_is_not_waited_for(tmp_path):
    started = time.monotonic()
    with EdgeGallery(tmp_path / "edge") as edge, QdrantGallery(location=":memory:") as local:
        wait_until_reachable(edge, 0)
        wait_until_reachable(local, 0)
    assert time.monotonic() - started < 1


def test_a_recognizer_started_before_its_redis_becomes_ready_once_redis_is_up(tmp_path):
    server, port = EmbeddedValkey(tmp_path / "vk"), free_port()
    from services.recognizer.stage import RecognizerStage

    settings = Settings(
        redis_url=server.url,
        namespace=f"r{uuid.uuid4().hex[:6]}",
        signing_key="11" * 32,
        gallery_url=f"edge://{tmp_path}/gallery",
        device="cpu",
        health_port=port,
        **signing_as("recognizer"),
    )
    try:
        with running(StreamWorker(RecognizerStage(settings), settings, consumer="r1")):
            wait_until(lambda: probe(port, "/startupz") == 503, 20, "probes answer while it waits")
            server.start()
            wait_until(lambda: probe(port, "/readyz") == 200, 120, "the recognizer ready once redis is up")
    finally:
        server.stop()


def test_a_worker_asked_to_stop_while_it_waits_for_redis_stops_without_waiting_out_the_bound(keyset):
    worker = StreamWorker(Upper(), settings_with_keys(keyset, redis_url=closed_redis_url(), startup_wait_s=600))
    with running(worker) as thread:
        wait_until(lambda: worker.heartbeat.startup().reason.startswith("redis at"), 20, "waiting for redis")
    assert not thread.is_alive(), "SIGTERM during the start-up wait ends the process"


def stderr_lines(process: subprocess.Popen) -> list[str]:
    """The process's stderr lines as they come (read on a thread: a test waits on them)."""
    lines: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    return lines


def test_a_worker_pod_deleted_during_any_start_up_wait_exits_cleanly_at_once(tmp_path):
    """SIGTERM while a worker waits for Redis, or (the recognizer, Redis up) for its Qdrant
    server: the pod exits at once as from a normal stop (0, no traceback), not SIGKILLed
    after the grace period while it waits out FACEPAY_STARTUP_WAIT_S."""
    server = EmbeddedValkey(tmp_path / "vk").start()
    try:
        waits = {
            "redis": worker_process("pose", FACEPAY_STARTUP_WAIT_S="600"),
            "qdrant": worker_process(
                "recognizer",
                FACEPAY_REDIS_URL=server.url,
                FACEPAY_NAMESPACE=f"s{uuid.uuid4().hex[:6]}",
                FACEPAY_GALLERY_URL=f"http://127.0.0.1:{free_port()}",
                FACEPAY_SIGNING_KEY="11" * 32,
                FACEPAY_DEVICE="cpu",
                FACEPAY_STARTUP_WAIT_S="600",
            ),
        }
        try:
            for what, process in waits.items():
                lines = stderr_lines(process)
                wait_until(
                    lambda: any(f"waiting for {what} at" in line for line in lines) or process.poll() is not None,  # noqa: B023 - waited on in this iteration
                    120,
                    f"a log line saying it waits for {what}",
                )
                assert process.poll() is None, "".join(lines)[-3000:]
                process.send_signal(signal.SIGTERM)
                asked = time.monotonic()
                process.wait(timeout=15)
                took = time.monotonic() - asked
                errors = "".join(lines)
                assert (what, process.returncode) == (what, 0), errors[-3000:]
                assert took < 3, f"{what}: exited {took:.1f} s after SIGTERM"
                assert "Traceback" not in errors, errors[-3000:]
        finally:
            for process in waits.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        server.stop()


def test_a_worker_asked_to_stop_while_redis_refuses_its_registration_stops_cleanly(tmp_path, keyset):
    """Redis answers but refuses writes (full) when the worker registers, the last step of its
    start-up: a stop request meanwhile is a normal stop, not an error."""
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        worker = StreamWorker(Upper(), settings_with_keys(keyset, redis_url=server.url, namespace="full"))
        failures: list[Exception] = []

        def run() -> None:
            try:
                worker.run()
            except Exception as exc:  # noqa: BLE001 - what would end the process with a traceback
                failures.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            wait_until(
                lambda: worker.heartbeat.startup().reason.startswith("register worker"), 20, "refused registration"
            )
            worker.stop()
            thread.join(10)
            assert not thread.is_alive()
            assert failures == []
        finally:
            worker.stop()
            client.config_set("maxmemory", 0)
