"""What one frame and one payment session cost in Redis, and what each process holds in memory.

    .venv/bin/python bench/footprint.py [--sessions 12] [--session-frames 8]

Starts the embedded pipeline (Valkey, gateway, four workers and the archiver as processes),
streams camera-sized frames (each test photo letterboxed into 640×480, JPEG quality 85, the size
a store camera sends), waits until every stage has drained, then reads, on the embedded Valkey:
MEMORY USAGE of every stream divided by its length (bytes per entry, what is held for
IMAGE_RETENTION_S / STREAM_RETENTION_S), the keys a decided session leaves behind, and the peak
resident memory (VmHWM) of each process. Feeds the Redis sizing table and the requests/limits of
README "Deploy on Kubernetes".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import sample_frames, wait_decisions
from facepay.config import SessionPolicy
from tests.e2e import camera, enroll, new_session, start_pipeline, wait_until_drained

STREAMS = ("frames", "faces", "aligned", "posed", "decisions", "decision-records", "dead")


def camera_frame(photo: bytes, width: int = 640, height: int = 480) -> bytes:
    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)))
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def peak_rss_mib(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--session-frames", type=int, default=8)
    args = parser.parse_args()
    photos, enroll_image = sample_frames()
    frames = [camera_frame(p) for p in photos]
    print(f"camera frames: {len(frames)} distinct, JPEG mean {np.mean([len(f) for f in frames]) / 1024:.1f} KiB")
    policy = SessionPolicy(require_blink=False, decide_early=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = start_pipeline(Path(tmp), policy)
        try:
            client = redis.Redis.from_url(pipeline.settings.redis_url)
            enroll(pipeline, "bench-user", [enroll_image])
            wait_until_drained(pipeline)
            base_memory = client.info("memory")["used_memory"]
            cam, sessions = camera(pipeline, "cam-1"), [new_session() for _ in range(args.sessions)]
            for i, session in enumerate(sessions):
                cam.stream_session(
                    session, [frames[(i * args.session_frames + j) % len(frames)] for j in range(args.session_frames)]
                )
            wait_decisions(pipeline, sessions)
            wait_until_drained(pipeline)
            total_frames = args.sessions * args.session_frames
            print(f"{args.sessions} sessions × {args.session_frames} frames = {total_frames} frames")
            for name in STREAMS:
                key = pipeline.settings.key(name)
                length = client.xlen(key)
                usage = client.memory_usage(key, samples=0) or 0
                per = usage / length if length else 0
                print(f"  stream {name:<10} entries {length:>5}  {usage / 1024:>9.1f} KiB  {per:>9.0f} B/entry")
            others: dict[str, list[int]] = {}
            for key in client.scan_iter(match=pipeline.settings.key("*"), count=1000):
                kind = key.decode().split(":")[1]
                if kind in STREAMS:
                    continue
                others.setdefault(kind, []).append(client.memory_usage(key, samples=0) or 0)
            for kind, sizes in sorted(others.items()):
                print(f"  keys {kind + ':*':<22} {len(sizes):>5} keys  {sum(sizes) / 1024:>9.1f} KiB")
            used = client.info("memory")["used_memory"] - base_memory
            print(
                f"used_memory growth over the run: {used / 1024 / 1024:.1f} MiB = {used / total_frames / 1024:.1f} KiB/frame"
            )
            for name, proc in sorted(pipeline.processes.items()):
                peak, now = peak_rss_mib(proc.pid)
                print(f"  process {name:<14} peak RSS {peak:>7.0f} MiB  now {now:>7.0f} MiB")
            if pipeline.valkey:
                valkey_pid = getattr(pipeline.valkey, "pid", None) or getattr(
                    getattr(pipeline.valkey, "process", None), "pid", None
                )
                if valkey_pid:
                    peak, now = peak_rss_mib(valkey_pid)
                    print(f"  process {'valkey':<14} peak RSS {peak:>7.0f} MiB  now {now:>7.0f} MiB")
            print(f"load average: {os.getloadavg()}")
        finally:
            pipeline.stop()


if __name__ == "__main__":
    main()
