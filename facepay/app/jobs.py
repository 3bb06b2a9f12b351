"""Batch work as rq jobs on the pipeline's own Redis: queue, optionally work here, wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from rq.job import Job

from facepay.runtime.redis_conn import is_cluster_url


def queue_url(settings) -> str:
    """Where rq's queue lives: `jobs_redis_url`, else `redis_url` — never a cluster (rq has no
    Redis Cluster support: its transactions and scripts span keys of many slots)."""
    url = settings.jobs_redis_url or settings.redis_url
    if is_cluster_url(url):
        raise ValueError(
            "rq jobs need a standalone Redis and FACEPAY_REDIS_URL names a cluster: set "
            "FACEPAY_JOBS_REDIS_URL to a standalone Redis/Valkey for the job queue"
        )
    return url


def rq_worker_environ(redis_url: str, rq_url: str | None = None) -> dict[str, str]:
    """The URL (with its password) goes in the environment, readable by this user only — not
    on the command line, which every user of the machine can read (ps, /proc/*/cmdline). The
    jobs read their Redis settings from the same variables (no credentials in job data).
    `rq_url`: the queue's own Redis when it is not the pipeline's (a cluster)."""
    return {
        **os.environ,
        "RQ_REDIS_URL": rq_url or redis_url,
        "REDIS_URL": redis_url,
        "FACEPAY_REDIS_URL": redis_url,
        "FACEPAY_REDIS_PASSWORD_FILE": "",
        "FACEPAY_REDIS_TLS_CA_FILE": "",
        "FACEPAY_REDIS_TLS_CERT_FILE": "",
        "FACEPAY_REDIS_TLS_KEY_FILE": "",
    }  # already folded into redis_url


def run_jobs(
    redis_url: str,
    queue_name: str,
    jobs: list[Job],
    inline_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
    worker_env: dict[str, str] | None = None,
    rq_url: str | None = None,
) -> list[Any]:
    """Wait for `jobs`; with inline_workers > 0 start that many `rq worker --burst` processes
    here (they exit when the queue is empty), else rely on the operator's own rq workers.
    Secrets reach the workers through their own environment (`worker_env`, and the Redis URL
    with its password), never through job data or a command line."""
    env = {**rq_worker_environ(redis_url, rq_url), **(worker_env or {})}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", "--burst", "--quiet", queue_name],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(inline_workers)
    ]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            done = [j for j in jobs if j.get_status(refresh=True) in ("finished", "failed")]
            if progress:
                progress(len(done), len(jobs))
            if len(done) == len(jobs):
                break
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"{len(jobs) - len(done)} of {len(jobs)} jobs unfinished after {timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.wait(timeout=60)
    return [_outcome(j) for j in jobs]


def _outcome(job: Job) -> Any:
    """What a finished job returned (facepay's own jobs return a dict), or why it failed."""
    if job.get_status() == "finished":
        value = job.return_value()
        if value is not None:
            return value
        return {"job": job.id, "status": "failed", "error": "finished without a recorded result"}
    result = job.latest_result()
    error = result.exc_string if result is not None else "no result recorded"
    return {"job": job.id, "status": "failed", "error": str(error)[-300:]}
