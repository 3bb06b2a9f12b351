"""Audit archive: write/read throughput of typical sessions on the embedded SeaweedFS, and the
server's footprint (`weed server` as EmbeddedS3 runs it vs `weed mini`).

    .venv/bin/python bench/archive.py [--sessions 200] [--frames 10] [--frame-kb 50] [--threads 4] [--mini]

A session: `--frames` frames of `--frame-kb` KB (random bytes: AES-GCM and sha256 cost the same
on any bytes, and JPEG does not compress further) with a full set of per-frame stage outputs.
Sequential writes to one store (every write appends to that store's chain), `--threads`
writers on distinct stores, the same writers racing for one store's chain, then reads with
decryption and a verify. Footprint: the weed process's RSS and CPU seconds (from /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepay.archive import (
    ArchivedFrame,
    ArchivedSession,
    ArchiveKeys,
    ArchiveSettings,
    ArchiveStore,
    Candidate,
    EmbeddedS3,
    SignedDecision,
)
from facepay.archive.embedded import weed_binary
from facepay.signing import sign

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


class MiniS3(EmbeddedS3):
    """`weed mini` with the same loopback/credentials set-up, for the footprint comparison only."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._ports += [self._free() for _ in range(2)]

    @staticmethod
    def _free() -> int:
        from facepay.runtime.embedded import free_port

        return free_port()

    def _args(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, admin, admin_grpc = self._ports
        return [
            str(weed_binary()),
            "mini",
            f"-dir={self.data_dir / 'store'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={self.config_file}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
        ]


def session(store: str, index: int, frames: int, frame_bytes: int) -> ArchivedSession:
    session_id = uuid.uuid4().hex
    decided_ms = int((T0 + timedelta(seconds=index)).timestamp() * 1000)
    event = sign(
        {"session": session_id, "store": store, "decision": "approve", "user_id": f"user-{index % 50}"},
        "bench-key",
        "k1",
    )
    return ArchivedSession(
        session_id=session_id,
        tenant="acme",
        store=store,
        camera="cam-1",
        first_frame_ms=decided_ms - 2000,
        decided_ms=decided_ms,
        decision=SignedDecision(event[b"payload"], event[b"sig"].decode(), "k1"),
        models={"detector": "mtcnn", "aligner": "facemesh", "recognizer": "dlib-resnet-v1+facemesh"},
        threshold=0.943,
        policy={"min_agreeing_frames": 3},
        frames=[
            ArchivedFrame(
                index=i,
                received_ms=decided_ms - 2000 + 100 * i,
                image=os.urandom(frame_bytes),
                image_format="jpeg",
                face_box=(1.0, 2.0, 3.0, 4.0),
                face_points=[(1.0, 2.0)] * 5,
                detector_score=0.99,
                landmarks=[(1.0, 2.0)] * 68,
                eye_aspect_ratio=0.27,
                liveness={"antispoof": 0.9},
                pitch=1.0,
                yaw=2.0,
                roll=3.0,
                eligible=True,
                top_k=[Candidate("user-1", 0.97), Candidate("user-2", 0.4)],
            )
            for i in range(frames)
        ],
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(label: str, count: int, action, server_pid: int, payload_mb: float) -> list[float]:
    latencies: list[float] = []
    cpu_before, client_before, started = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    action(latencies)
    wall = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server_pid) - cpu_before, time.process_time() - client_before
    line = f"{label:<44} {count / wall:7.1f} sessions/s {payload_mb * count / wall:6.1f} MB/s"
    if latencies:
        latencies.sort()
        line += f"  p50 {statistics.median(latencies) * 1000:6.1f} ms  p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:6.1f} ms"
    print(line + f"  cpu/session: weed {server_cpu / count * 1000:5.1f} ms, client {client_cpu / count * 1000:5.1f} ms")
    return latencies


def run(args: argparse.Namespace) -> None:
    server_class = MiniS3 if args.mini else EmbeddedS3
    with tempfile.TemporaryDirectory() as tmp, server_class(Path(tmp)) as s3:
        pid = s3.process.pid
        time.sleep(5)
        idle_before = cpu_seconds(pid)
        time.sleep(10)
        print(
            f"weed {'mini' if args.mini else 'server'}: started, RSS {rss_mb(pid):.0f} MB, idle CPU {(cpu_seconds(pid) - idle_before) / 10 * 100:.1f} %"
        )
        keys = ArchiveKeys.generate(["acme"])
        archive = ArchiveStore(
            ArchiveSettings.from_url(f"{s3.url}/facepay-archive"),
            keys,
            access_key_id=s3.credentials.access_key_id,
            secret_access_key=s3.credentials.secret_access_key,
        )
        archive.ensure_bucket()
        payload_mb = args.frames * args.frame_kb / 1024
        print(
            f"session: {args.frames} frames x {args.frame_kb} KB = {payload_mb:.2f} MB; {args.sessions} sessions per run"
        )

        sessions = [session("store-1", i, args.frames, args.frame_kb * 1024) for i in range(args.sessions)]
        keys_written: list[str] = []

        def sequential(latencies: list[float]) -> None:
            for s in sessions:
                t = time.perf_counter()
                keys_written.append(archive.archive(s).key)
                latencies.append(time.perf_counter() - t)

        timed("write, 1 writer, one store", args.sessions, sequential, pid, payload_mb)

        def parallel(same_store: bool):
            def action(latencies: list[float]) -> None:
                def writer(w: int) -> None:
                    store = "store-race" if same_store else f"store-p{w}"
                    for i in range(args.sessions // args.threads):
                        s = session(store, i * args.threads + w, args.frames, args.frame_kb * 1024)
                        t = time.perf_counter()
                        archive.archive(s)
                        latencies.append(time.perf_counter() - t)

                threads = [threading.Thread(target=writer, args=(w,)) for w in range(args.threads)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()

            return action

        count = args.sessions // args.threads * args.threads
        timed(f"write, {args.threads} writers, distinct stores", count, parallel(False), pid, payload_mb)
        timed(f"write, {args.threads} writers racing for one chain", count, parallel(True), pid, payload_mb)

        def read(latencies: list[float]) -> None:
            for key in keys_written:
                t = time.perf_counter()
                assert len(archive.read(key).frames) == args.frames
                latencies.append(time.perf_counter() - t)

        timed("read + decrypt, 1 reader", args.sessions, read, pid, payload_mb)

        def verify(latencies: list[float]) -> None:
            report = archive.verify("acme", "store-1", T0 - timedelta(hours=1), T0 + timedelta(hours=2))
            assert report.ok and report.checked_sessions == args.sessions, report.problems

        timed("verify (chain + every session's hashes)", args.sessions, verify, pid, payload_mb)
        race = archive.verify("acme", "store-race", T0 - timedelta(hours=1), T0 + timedelta(hours=2))
        assert race.ok and race.checked_sessions == count, race.problems
        print(
            f"weed RSS after the runs: {rss_mb(pid):.0f} MB; data dir {sum(f.stat().st_size for f in Path(tmp).rglob('*') if f.is_file()) / 2**20:.0f} MB"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--frame-kb", type=int, default=50)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--mini", action="store_true", help="run `weed mini` instead (footprint comparison)")
    run(parser.parse_args())
