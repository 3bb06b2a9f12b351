"""Reading decision events: as a gRPC message, verified, or with a backend's own consumer group."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import redis

from facepay.contract import pb
from facepay.signing import verify


def to_proto(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> pb.DecisionEvent:
    payload = fields[b"payload"]
    event = json.loads(payload)
    return pb.DecisionEvent(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        session_id=event["session_id"], store_id=event["store_id"], camera_id=event["camera_id"],
        decision=pb.APPROVE if event["decision"] == "approve" else pb.DECLINE,
        user_id=event["user_id"], score=event["score"], threshold=event["threshold"],
        reasons=event["reasons"], model_ids=event["model_ids"], first_frame_ms=event["first_frame_ms"],
        decided_at_ms=event["decided_at_ms"], frames_seen=event["frames_seen"],
        frames_eligible=event["frames_eligible"], payload=payload,
        signature=fields[b"sig"].decode(), key_id=fields[b"kid"].decode(),
    )


def verify_event(event: pb.DecisionEvent, keys: Mapping[str, str]) -> dict:
    """The signed fields of a DecisionEvent, or SignatureError if anything was altered."""
    return verify(event.payload, event.signature, event.key_id, keys)


def consume(client: redis.Redis, stream: str, group: str, consumer: str, block_ms: int = 1000,
            start: str = "$") -> Iterator[tuple[bytes, dict]]:
    """A payment backend reading decisions with its own consumer group (ack after handling).

    A new group starts at `start`: "$" (only new decisions) by default, "0" to replay the
    retained history; events carry `event_id` for a backend that must deduplicate."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    while True:
        for _, items in client.xreadgroup(group, consumer, {stream: ">"}, count=32, block=block_ms) or []:
            yield from items
