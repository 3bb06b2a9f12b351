"""Enrolling users from photos: one person over gRPC, or a folder tree as rq jobs.

Enrollment travels the same stages as payment frames (detector, alignment, pose gate); the
recognizer that owns the gallery judges each photo and writes the template. A folder tree
(one sub-folder per person, named by user id) becomes one rq job per person on the same
Redis, so any number of `rq worker facepay-enroll` processes can share a large batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from facepay.app.camera import IMAGE_SUFFIXES
from facepay.app.jobs import run_jobs
from facepay.config import load_settings
from facepay.contract import pb, rpc
from facepay.grpc_tls import ClientTLS, client_channel

QUEUE = "facepay-enroll"


def gateway_target(grpc_address: str) -> str:
    """Where a client on this machine reaches a gateway listening on `grpc_address`."""
    host, _, port = grpc_address.rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"


def photos_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def enroll_images(
    target: str,
    operator_token: str,
    user_id: str,
    tenant: str,
    images: list[bytes],
    phone_suffix: str = "",
    timeout_s: float = 300,
    tls: ClientTLS | None = None,
) -> dict:
    """One Enroll call; returns a plain summary (status, accepted count, reasons per photo)."""
    metadata = {"phone_suffix": phone_suffix} if phone_suffix else {}
    with client_channel(target, tls) as channel:
        reply = rpc.FaceGatewayStub(channel).Enroll(
            pb.EnrollRequest(user_id=user_id, tenant_id=tenant, images=images, metadata=metadata),
            metadata=(("authorization", f"Bearer {operator_token}"),),
            timeout=timeout_s,
        )
    return {
        "user_id": reply.user_id,
        "status": pb.EnrollResponse.Status.Name(reply.status).lower(),
        "accepted": sum(i.accepted for i in reply.images),
        "images": len(reply.images),
        "rejected": {i.index: i.detail for i in reply.images if not i.accepted},
        "duplicate_of": reply.duplicate_of,
        "duplicate_score": round(reply.duplicate_score, 4),
    }


def enroll_person_job(
    target: str, user_id: str, tenant: str, paths: list[str], phone_suffix: str = "", tls: ClientTLS | None = None
) -> dict:
    """The rq job: one person's folder. The operator token is the rq worker's own setting:
    job data lives in Redis, where anyone who can read it would find the token (tls names
    certificate files, never their contents)."""
    operator_token = load_settings().operator_token
    if not operator_token:
        raise RuntimeError("FACEPAY_OPERATOR_TOKEN is not set in this rq worker's environment")
    return enroll_images(
        target, operator_token, user_id, tenant, [Path(p).read_bytes() for p in paths], phone_suffix, tls=tls
    )


def enroll_tree(
    redis_url: str,
    root: Path,
    target: str,
    operator_token: str,
    tenant: str,
    inline_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
    tls: ClientTLS | None = None,
) -> list[dict]:
    """One rq job per person folder (see `facepay.app.jobs.run_jobs` for the workers)."""
    import redis
    from rq import Queue

    queue = Queue(QUEUE, connection=redis.Redis.from_url(redis_url))
    people = [d for d in sorted(Path(root).iterdir()) if d.is_dir() and photos_in(d)]
    jobs = [
        queue.enqueue(
            enroll_person_job,
            target,
            d.name,
            tenant,
            [str(p) for p in photos_in(d)],
            tls=tls,
            job_timeout=600,
            result_ttl=86400,
        )
        for d in people
    ]
    return run_jobs(
        redis_url,
        QUEUE,
        jobs,
        inline_workers,
        progress,
        timeout_s,
        worker_env={"FACEPAY_OPERATOR_TOKEN": operator_token},
    )
