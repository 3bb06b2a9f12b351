"""Re-index the gallery under another recognizer model, as rq jobs (one per user).

Each job embeds the user's kept enrollment chips with the new model and hands the templates
to the recognizer that owns the gallery (`store_templates`), into the new model's template
space. Switch `FACEPAY_RECOGNIZER_MODEL` afterwards: every user is already there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from facepay.app.admin import call
from facepay.app.jobs import queue_url, run_jobs
from facepay.config import Settings, load_settings
from facepay.images import decode_trusted
from facepay.runtime.redis_conn import connect
from services.recognizer.embedder import load_embedder, template_space
from services.recognizer.enrollment import FaceSources

QUEUE = "facepay-reindex"


@lru_cache(maxsize=2)
def _embedder(model: str, device: str):
    return load_embedder(model, device)  # once per rq worker process


def reindex_user_job(namespace: str, landmarks_model: str, device: str, model: str, user_id: str) -> dict:
    # The Redis URL and the operator's key (to sign `store_templates`) come from the rq worker's
    # environment: job data (in Redis) holds no credentials.
    settings = load_settings().replace(namespace=namespace, landmarks_model=landmarks_model, device=device)
    source = FaceSources(connect(settings.redis_url), settings).load(user_id)
    if source is None:
        return {"user_id": user_id, "status": "no_source"}
    embedder = _embedder(model, device)
    chips = [decode_trusted(c[embedder.chip_template]) for c in source["chips"] if embedder.chip_template in c]
    if not chips:
        return {"user_id": user_id, "status": f"no {embedder.chip_template} chips kept"}
    space = template_space(embedder.model_id, landmarks_model)
    call(
        settings,
        "store_templates",
        space=space,
        user_id=user_id,
        tenant=source["tenant"],
        phone_suffix=source["phone_suffix"],
        samples=embedder.embed(chips).tolist(),
    )
    return {"user_id": user_id, "status": "reindexed", "space": space, "samples": len(chips)}


def reindex(
    settings: Settings,
    model: str,
    inline_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
) -> list[dict]:
    import redis
    from rq import Queue

    users = sorted(FaceSources(connect(settings.redis_url), settings).users())
    queue = Queue(QUEUE, connection=redis.Redis.from_url(queue_url(settings)))
    jobs = [
        queue.enqueue(
            reindex_user_job,
            settings.namespace,
            settings.landmarks_model,
            settings.device,
            model,
            user,
            job_timeout=600,
            result_ttl=86400,
        )
        for user in users
    ]
    key_files = {
        "FACEPAY_OPERATOR_KEY_FILE": settings.operator_key_file,
        "FACEPAY_TRUSTED_KEYS_FILE": settings.trusted_keys_file,
    }
    return run_jobs(
        settings.redis_url,
        QUEUE,
        jobs,
        inline_workers,
        progress,
        timeout_s,
        worker_env=key_files,
        rq_url=queue_url(settings),
    )
