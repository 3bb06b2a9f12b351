"""Operator commands sent to the recognizer that owns the gallery (users, lock-outs).

A command is signed with the operator's key (`FACEPAY_OPERATOR_KEY_FILE`) and carries when it
was issued and a fresh request id, so the recognizer refuses forged, stale and repeated ones;
only a reply signed by the recognizer that names this request id is believed.
"""

from __future__ import annotations

import time
import uuid

import msgpack

from facepay.config import Settings
from facepay.keys import operator_keyring
from facepay.messages import FIELD, AdminMsg, FrameRef
from facepay.redaction import redact_url
from facepay.runtime.envelope import Unauthenticated, open_entry, seal
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import connect


class AdminError(RuntimeError):
    pass


def call(settings: Settings, command: str, timeout_s: float = 30.0, **args: str) -> dict:
    keys = operator_keyring(settings)
    client = connect(settings.redis_url)
    replies = settings.key("admin-replies")
    last = client.xrevrange(replies, count=1)
    cursor = last[0][0] if last else b"0-0"
    request_id = uuid.uuid4().hex
    now_ms = int(time.time() * 1000)
    ref = FrameRef(session_id=f"admin-{request_id}", store_id="", camera_id="admin", sequence=0, captured_ms=now_ms)
    command_msg = AdminMsg(ref=ref, command=command, args=args, request_id=request_id, issued_at_ms=now_ms)
    posed = Partitions.of(settings).stream("posed", f"/{ref.session_id}")  # the recognizer reads every partition
    client.xadd(posed, seal({FIELD: command_msg.encode()}, posed, keys.signer))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, items in client.xread({replies: cursor}, block=500, count=100) or []:
            for entry_id, fields in items:
                cursor = entry_id
                if fields.get(b"request") == request_id.encode():
                    try:
                        _, body = open_entry(fields, replies, keys.trusted, {"recognizer"})
                    except Unauthenticated:
                        continue  # not the recognizer's: someone else wrote it
                    result = msgpack.unpackb(body)
                    if result.pop("request_id", None) != request_id:
                        continue
                    if not result.pop("ok"):
                        raise AdminError(result["error"])
                    return result
    raise AdminError(
        f"no recognizer answered within {timeout_s:.0f} s (is `facepay worker recognizer` running "
        f"against {redact_url(settings.redis_url)}, namespace {settings.namespace}?)"
    )
