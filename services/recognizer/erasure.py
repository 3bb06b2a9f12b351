"""Right to erasure beyond the gallery: what a deleted user may still have left in Redis.

Face images and chips leave the stage streams as soon as the next stage has them (the runtime
erases enrollment entries when it acknowledges them) and an enrollment's session state goes
when it is decided; what can still name or show the user when they are deleted is erased here:
an enrollment still in progress, the enrollment results naming them, operator replies naming
them. Then the server is asked to rewrite its append-only file, so that erased entries leave
the disk too (the AOF keeps every command until it is rewritten).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import msgpack
import redis

from facepay.config import Settings
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import is_cluster
from facepay.vocabulary import Purpose

log = logging.getLogger(__name__)


def erase_user_traces(client: redis.Redis, settings: Settings, user_id: str) -> dict[str, int]:
    partitions = Partitions.of(settings)
    erased = {
        "enrollment_sessions": _erase_enrollment_sessions(client, settings, user_id),
        "enrollment_results": sum(
            _erase_entries_naming(client, stream, user_id) for stream in partitions.streams("enrollments")
        ),
        "admin_replies": _erase_entries_naming(client, settings.key("admin-replies"), user_id),
    }
    _rewrite_append_only_file(client)
    return erased


def _erase_enrollment_sessions(client: redis.Redis, settings: Settings, user_id: str) -> int:
    erased = 0
    # every partition's session states (a cluster client scans every primary)
    pattern = Partitions.of(settings).key(0, "session", "*").replace("{p00}", "{p*}")
    for key in client.scan_iter(match=pattern, count=500):
        meta = client.hget(key, "meta")
        if meta and (ref := msgpack.unpackb(meta)).get("purpose") == Purpose.ENROLL and ref.get("user_id") == user_id:
            erased += client.delete(key)
    return erased


def _erase_entries_naming(client: redis.Redis, stream: str, user_id: str) -> int:
    doomed = [entry_id for entry_id, fields in _entries(client, stream) if _names(fields.get(b"m"), user_id)]
    for start in range(0, len(doomed), 500):
        client.xdel(stream, *doomed[start : start + 500])
    return len(doomed)


def _entries(client: redis.Redis, stream: str, chunk: int = 500) -> Iterator[tuple[bytes, dict]]:
    start = "-"
    while batch := client.xrange(stream, min=start, count=chunk):
        yield from batch
        if len(batch) < chunk:
            return
        start = "(" + batch[-1][0].decode()


def _names(packed: bytes | None, user_id: str) -> bool:
    """Whether a msgpack'd reply holds `user_id` as a value anywhere (lists, nested maps)."""
    if not packed:
        return False
    try:
        stack = [msgpack.unpackb(packed)]
    except (ValueError, msgpack.UnpackException):
        return False
    while stack:
        value = stack.pop()
        if value == user_id:
            return True
        if isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
    return False


def _rewrite_append_only_file(client: redis.Redis) -> None:
    try:
        if is_cluster(client):  # the erased entries were on several primaries
            for node in client.get_primaries():
                client.get_redis_connection(node).bgrewriteaof()
        else:
            client.bgrewriteaof()
    except redis.ResponseError as exc:  # not permitted (managed Redis), or one already running
        log.warning(
            "AOF rewrite not started: erased entries stay in the server's files until its next rewrite",
            extra={"error": str(exc)},
        )
