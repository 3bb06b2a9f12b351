"""Operator commands sent to the recognizer that owns the gallery (users, lock-outs)."""

from __future__ import annotations

import time
import uuid

import msgpack

from facepay.config import Settings
from facepay.messages import AdminMsg, FrameRef
from facepay.redaction import redact_url
from facepay.runtime.redis_conn import connect


class AdminError(RuntimeError):
    pass


def call(settings: Settings, command: str, timeout_s: float = 30.0, **args: str) -> dict:
    client = connect(settings.redis_url)
    replies = settings.key("admin-replies")
    last = client.xrevrange(replies, count=1)
    cursor = last[0][0] if last else b"0-0"
    request_id = uuid.uuid4().hex
    ref = FrameRef(session_id=f"admin-{request_id}", store_id="", camera_id="admin", sequence=0,
                   captured_ms=int(time.time() * 1000))
    client.xadd(settings.key("posed"), {b"m": AdminMsg(ref=ref, command=command, args=args, request_id=request_id).encode()})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, items in client.xread({replies: cursor}, block=500, count=100) or []:
            for entry_id, fields in items:
                cursor = entry_id
                if fields.get(b"request") == request_id.encode():
                    result = msgpack.unpackb(fields[b"m"])
                    if not result.pop("ok"):
                        raise AdminError(result["error"])
                    return result
    raise AdminError(f"no recognizer answered within {timeout_s:.0f} s (is `facepay worker recognizer` running "
                     f"against {redact_url(settings.redis_url)}, namespace {settings.namespace}?)")
