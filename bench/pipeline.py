"""Throughput and latency of the running pipeline vs. the same models in one process.

    .venv/bin/python bench/pipeline.py [--frames 160] [--session-frames 8]

Starts the embedded pipeline (Valkey, gateway, four workers as processes), streams N frames
from two cameras as fast as the gateway takes them, and reads the decisions. Then calls the
same models in one process in a loop over the same frames. Prints both and their ratio,
measured in this one run. Every frame is embedded (decide_early off), so the work is equal.
`--detectors mtcnn,blazeface-back` repeats all of it for each detector model, one after the
other in the same run (before/after a detector change on the same machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepay.config import SessionPolicy
from tests.e2e import camera, enroll, new_session, start_pipeline

# The real-face data as the tests find it (FACEPAY_TEST_DATA, default ../shared/data).
DATA = (
    Path(os.environ.get("FACEPAY_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    / "faces"
    / "identities"
)


def sample_frames() -> tuple[list[bytes], bytes]:
    """Real photos: the test data when present, else scikit-image's astronaut."""
    if DATA.exists():
        photos = sorted(DATA.glob("*/*.jpg"))
        return [p.read_bytes() for p in photos[:24]], photos[0].read_bytes()
    import cv2
    from skimage import data

    face = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    return [face], face


def run_pipeline(frames: list[bytes], enroll_image: bytes, total: int, per_session: int, detector: str) -> dict:
    policy = SessionPolicy(require_blink=False, decide_early=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = start_pipeline(Path(tmp), policy, detector_model=detector)
        try:
            enroll(pipeline, "bench-user", [enroll_image])
            sessions = [new_session() for _ in range(total // per_session)]
            started = time.time()

            def play(camera_id: str, mine: list[str]) -> None:
                cam = camera(pipeline, camera_id)
                for i, session in enumerate(mine):
                    cam.stream_session(
                        session, [frames[(i * per_session + j) % len(frames)] for j in range(per_session)]
                    )

            threads = [
                threading.Thread(target=play, args=(c, sessions[k::2])) for k, c in enumerate(("cam-1", "cam-2"))
            ]
            [t.start() for t in threads]
            [t.join() for t in threads]
            events = wait_decisions(pipeline, sessions)
            finished = max(e["decided_at_ms"] for e in events) / 1000
            flood = sorted((e["decided_at_ms"] - e["first_frame_ms"]) / 1000 for e in events)
            # Unloaded: one session at a time, the next only after the previous was decided.
            cam, quiet = camera(pipeline, "cam-1"), []
            for i in range(10):
                session = new_session()
                cam.stream_session(session, [frames[(i + j) % len(frames)] for j in range(per_session)])
                event = wait_decisions(pipeline, [session])[0]
                quiet.append((event["decided_at_ms"] - event["first_frame_ms"]) / 1000)
            return {
                "frames_per_s": len(sessions) * per_session / (finished - started),
                "p50_s": statistics.median(flood),
                "p99_s": percentile(flood, 0.99),
                "quiet_p50_s": statistics.median(quiet),
                "quiet_p99_s": percentile(sorted(quiet), 0.99),
            }
        finally:
            pipeline.stop()


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_decisions(pipeline, sessions: list[str], timeout_s: float = 600) -> list[dict]:
    client = redis.Redis.from_url(pipeline.settings.redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = [json.loads(f[b"payload"]) for _, f in client.xrange(pipeline.settings.key("decisions"))]
        events = [e for e in events if e["session_id"] in set(sessions)]
        if len(events) == len(sessions):
            return events
        time.sleep(0.2)
    raise TimeoutError("not every session was decided")


def run_in_process(frames: list[bytes], total: int, detector: str) -> dict:
    """The same stage code and models, one process, one frame at a time: detector → aligner
    (landmarks, chips, age/gender, passive liveness) → pose → embed → gallery search."""
    import torch

    from facepay.config import Settings
    from facepay.gallery import Template, open_gallery
    from facepay.images import decode_trusted
    from facepay.messages import FrameMsg, FrameRef, PosedMsg, decode
    from services.aligner.stage import AlignerStage
    from services.detector.stage import DetectorStage
    from services.pose.stage import PoseStage
    from services.recognizer.embedder import load_embedder, template_space

    torch.set_num_threads(1)
    settings = Settings(device="cpu", detector_model=detector)
    stages = [DetectorStage(settings), AlignerStage(settings), PoseStage(settings)]
    for stage in stages:
        stage.start()
    embedder = load_embedder(settings.recognizer_model, "cpu")
    space = template_space(embedder.model_id, settings.landmarks_model)
    with tempfile.TemporaryDirectory() as tmp:
        gallery = open_gallery(f"edge://{tmp}/gallery")
        gallery.ensure_collection(space, embedder.dim)
        gallery.upsert(space, [Template("bench-user", np.eye(embedder.dim, dtype=np.float32)[0], "demo")])
        started = time.perf_counter()
        for i in range(total):
            message = FrameMsg(ref=FrameRef("s", "store-1", "cam-1", i, 0), image=frames[i % len(frames)])
            for stage in stages:
                message = decode(stage.process([message])[0].payload)
            if isinstance(message, PosedMsg) and message.eligible:
                vector = embedder.embed([decode_trusted(message.chips[embedder.chip_template])])[0]
                gallery.search(space, vector, limit=2, tenant="demo")
        elapsed = time.perf_counter() - started
        gallery.close()
    return {"frames_per_s": total / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--session-frames", type=int, default=8)
    parser.add_argument("--detectors", default="", help="comma-separated detector models (default: the setting's)")
    args = parser.parse_args()
    from facepay.config import load_settings

    frames, enroll_image = sample_frames()
    print(f"frames: {args.frames} in sessions of {args.session_frames}, {len(frames)} distinct photos, 2 cameras")
    for detector in (args.detectors or load_settings().detector_model).split(","):
        load = os.getloadavg()
        report(detector, frames, enroll_image, args)
        print(f"load average before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}", flush=True)


def report(detector: str, frames: list[bytes], enroll_image: bytes, args: argparse.Namespace) -> None:
    piped = run_pipeline(frames, enroll_image, args.frames, args.session_frames, detector)
    alone = run_in_process(frames, args.frames, detector)
    print(f"--- detector {detector}")
    print(
        f"pipeline (gateway + 4 worker processes, embedded Valkey): {piped['frames_per_s']:.1f} frames/s; "
        f"first frame → decision under that flood p50 {piped['p50_s']:.2f} s, p99 {piped['p99_s']:.2f} s"
    )
    print(
        f"one session at a time ({args.session_frames} frames, 10 sessions): first frame → decision "
        f"p50 {piped['quiet_p50_s']:.2f} s, p99 {piped['quiet_p99_s']:.2f} s"
    )
    print(f"same stages and models, one process, batch 1 loop:       {alone['frames_per_s']:.1f} frames/s")
    print(f"ratio pipeline / in-process: {piped['frames_per_s'] / alone['frames_per_s']:.2f}")


if __name__ == "__main__":
    main()
