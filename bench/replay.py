"""Replay vs live processing on the same machine, in one run.

    .venv/bin/python bench/replay.py [--frames 96] [--session-frames 8]

Starts the embedded pipeline (Valkey, SeaweedFS, gateway, four workers, archiver), streams the
sessions from two cameras as fast as the gateway takes them (live: first frame sent → last
decision), waits until the archiver has archived them all, then replays them with
`facepay.app.replay.run_replay` (replay: first frame injected → last replayed decision; the
replay's worker start-up is reported apart). Same models, same frames, same machine; the
live pipeline sits idle during the replay. Every frame is embedded (decide_early off).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import sample_frames, wait_decisions
from facepay.app.replay import ReplayOptions, run_replay
from facepay.config import SessionPolicy
from tests.e2e import camera, enroll, new_session, start_pipeline
from tests.test_replay import archive_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--session-frames", type=int, default=8)
    args = parser.parse_args()
    frames, enroll_image = sample_frames()
    policy = SessionPolicy(require_blink=False, decide_early=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = start_pipeline(Path(tmp) / "live", policy)
        try:
            enroll(pipeline, "bench-user", [enroll_image])
            sessions = [new_session() for _ in range(args.frames // args.session_frames)]
            started = time.time()

            def play(camera_id: str, mine: list[str]) -> None:
                cam = camera(pipeline, camera_id)
                for i, session in enumerate(mine):
                    cam.stream_session(
                        session,
                        [frames[(i * args.session_frames + j) % len(frames)] for j in range(args.session_frames)],
                    )

            threads = [
                threading.Thread(target=play, args=(c, sessions[k::2])) for k, c in enumerate(("cam-1", "cam-2"))
            ]
            [t.start() for t in threads]
            [t.join() for t in threads]
            events = wait_decisions(pipeline, sessions)
            live_s = max(e["decided_at_ms"] for e in events) / 1000 - started
            archive = archive_of(pipeline)
            since = datetime.now(UTC) - timedelta(hours=1)
            deadline = time.monotonic() + 600
            while len(archive.list_sessions("demo", "store-1", since, datetime.now(UTC) + timedelta(minutes=1))) < len(
                sessions
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("the archiver did not archive every session")
                time.sleep(0.5)
            import os

            os.environ.update(pipeline.archive_env())
            report = run_replay(
                pipeline.settings,
                archive,
                ReplayOptions(
                    start=since, end=datetime.now(UTC) + timedelta(minutes=1), store="store-1", out=Path(tmp) / "replay"
                ),
            )
        finally:
            pipeline.stop()
    total = len(sessions) * args.session_frames
    replay = report["replay"]
    result = {
        "frames": total,
        "sessions": len(sessions),
        "live_frames_per_s": round(total / live_s, 2),
        "replay_frames_per_s": round(replay["frames"] / replay["replay_s"], 2),
        "replay_worker_start_s": replay["workers_ready_s"],
        "replay_differences": report["differences"],
    }
    result["replay_vs_live"] = round(result["replay_frames_per_s"] / result["live_frames_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
