"""Reading decision events: as a gRPC message, verified, or with a backend's own consumer group.

A signed event is only good for the store it names, for a short while, and once. `verify_event`
(and `consume`) check all three; act on the fields they return, never on unsigned ones (the
stream's `store` field or the proto's copies of the payload's fields).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import redis

from facepay.contract import pb
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import is_cluster
from facepay.signing import SignatureError, verify
from facepay.vocabulary import Decision

log = logging.getLogger(__name__)

# An approval authorises a payment the point of sale is waiting for now: an event older than
# this is refused (a backend replaying history on purpose passes max_age_s=None).
MAX_EVENT_AGE_S = 300.0
# How far a recognizer's clock may run ahead of the backend's.
CLOCK_SKEW_S = 30.0


class EventRefused(SignatureError):
    """A correctly signed event this backend must not act on: another store's, too old (or from
    the future), or already seen. A SignatureError, so code that refuses those refuses these."""


def to_proto(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> pb.DecisionEvent:
    payload = fields[b"payload"]
    event = json.loads(payload)
    return pb.DecisionEvent(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        session_id=event["session_id"],
        store_id=event["store_id"],
        camera_id=event["camera_id"],
        decision=pb.APPROVE if event["decision"] == Decision.APPROVE else pb.DECLINE,
        user_id=event["user_id"],
        score=event["score"],
        threshold=event["threshold"],
        reasons=event["reasons"],
        model_ids=event["model_ids"],
        first_frame_ms=event["first_frame_ms"],
        decided_at_ms=event["decided_at_ms"],
        frames_seen=event["frames_seen"],
        frames_eligible=event["frames_eligible"],
        payload=payload,
        signature=fields[b"sig"].decode(),
        key_id=fields[b"kid"].decode(),
    )


def verify_event(
    event: pb.DecisionEvent,
    keys: Mapping[str, str],
    store_id: str,
    max_age_s: float | None = MAX_EVENT_AGE_S,
    seen: SeenEvents | None = None,
    now_ms: int | None = None,
) -> dict:
    """The signed fields of a DecisionEvent of `store_id`, or SignatureError if anything was
    altered, EventRefused if it is another store's, older than `max_age_s`, or (with `seen`)
    already verified once."""
    return verify_payload(event.payload, event.signature, event.key_id, keys, store_id, max_age_s, seen, now_ms)


def verify_entry(
    fields: Mapping[bytes, bytes],
    keys: Mapping[str, str],
    store_id: str,
    max_age_s: float | None = MAX_EVENT_AGE_S,
    seen: SeenEvents | None = None,
    now_ms: int | None = None,
) -> dict:
    """The same checks on a raw `{ns}:decisions` stream entry; SignatureError if it is not one."""
    try:
        payload, signature, key_id = fields[b"payload"], fields[b"sig"].decode(), fields[b"kid"].decode()
    except (KeyError, UnicodeDecodeError, AttributeError) as exc:
        raise SignatureError(f"not a signed decision entry: {exc!r}") from exc
    return verify_payload(payload, signature, key_id, keys, store_id, max_age_s, seen, now_ms)


def verify_payload(
    payload: bytes,
    signature: str,
    key_id: str,
    keys: Mapping[str, str],
    store_id: str,
    max_age_s: float | None = MAX_EVENT_AGE_S,
    seen: SeenEvents | None = None,
    now_ms: int | None = None,
) -> dict:
    try:
        event = verify(payload, signature, key_id, keys)
    except SignatureError:
        raise
    except ValueError as exc:  # a valid signature over bytes that are not JSON
        raise SignatureError(f"signed payload is not an event: {exc}") from exc
    if not isinstance(event, dict):
        raise SignatureError("signed payload is not an event")
    if event.get("store_id") != store_id:
        raise EventRefused(f"event of store {event.get('store_id')!r}, expected {store_id!r}")
    if max_age_s is not None:
        _check_age(event, max_age_s, int(time.time() * 1000) if now_ms is None else now_ms)
    if seen is not None and not seen.first_time(str(event.get("event_id", "")), max_age_s):
        raise EventRefused(f"event {event.get('event_id')!r} already seen: a replay")
    return event


def _check_age(event: dict, max_age_s: float, now_ms: int) -> None:
    decided_at = event.get("decided_at_ms")
    if not isinstance(decided_at, int):
        raise EventRefused("event carries no decision time")
    if decided_at > now_ms + CLOCK_SKEW_S * 1000:
        raise EventRefused(f"event decided {(decided_at - now_ms) / 1000:.0f} s in the future")
    if decided_at < now_ms - max_age_s * 1000:
        raise EventRefused(f"event too old: decided {(now_ms - decided_at) / 1000:.0f} s ago (max {max_age_s:.0f} s)")


class SeenEvents:
    """Event ids already acted on, so that a replayed event is refused the second time.

    In memory for one backend process; with a Redis client, shared by a backend's replicas
    (SET NX per event id). Ids are remembered only as long as an event can pass the age check
    (the maximum age plus the clock skew): an older replay is refused by its age.
    """

    def __init__(
        self, client: redis.Redis | None = None, key: str = "facepay-backend:seen", max_in_memory: int = 100_000
    ) -> None:
        self.client, self.key, self.max_in_memory = client, key, max_in_memory
        self._ids: OrderedDict[str, float] = OrderedDict()

    def first_time(self, event_id: str, max_age_s: float | None = MAX_EVENT_AGE_S) -> bool:
        if not event_id:
            return False  # an event without an id cannot be deduplicated: refuse it
        window_s = (max_age_s if max_age_s is not None else 7 * 24 * 3600) + CLOCK_SKEW_S
        if self.client is not None:
            return bool(self.client.set(f"{self.key}:{event_id}", 1, nx=True, ex=max(1, int(window_s))))
        now = time.monotonic()
        while self._ids and (next(iter(self._ids.values())) < now or len(self._ids) >= self.max_in_memory):
            self._ids.popitem(last=False)
        if event_id in self._ids:
            return False
        self._ids[event_id] = now + window_s
        return True


def consume(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    keys: Mapping[str, str],
    store_id: str,
    seen: SeenEvents | None = None,
    max_age_s: float | None = MAX_EVENT_AGE_S,
    block_ms: int = 1000,
    start: str = "$",
) -> Iterator[tuple[bytes, dict]]:
    """A payment backend reading its store's decisions with its own consumer group.

    Yields (entry id, verified event) once per event id; acknowledge each after handling it.
    Entries it must not act on (another store's, tampered, too old, replayed, malformed) are
    logged, acknowledged and skipped: one bad entry never stops the stream. A new group starts
    at `start`: "$" (only new decisions) by default, "0" to replay the retained history (with
    max_age_s=None). Without `seen`, ids are remembered in this process only."""
    seen = seen if seen is not None else SeenEvents()
    _create_group(client, stream, group, start)
    while True:
        for _, items in client.xreadgroup(group, consumer, {stream: ">"}, count=32, block=block_ms) or []:
            yield from _verified(client, stream, group, items, keys, store_id, max_age_s, seen)


def _create_group(client: redis.Redis, stream: str, group: str, start: str) -> None:
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _verified(
    client: redis.Redis,
    stream: str | bytes,
    group: str,
    items: list,
    keys: Mapping[str, str],
    store_id: str,
    max_age_s: float | None,
    seen: SeenEvents,
) -> Iterator[tuple[bytes, dict]]:
    """The entries a backend may act on; the others are logged and acknowledged, never fatal."""
    for entry_id, fields in items:
        try:
            event = verify_entry(fields, keys, store_id, max_age_s, seen)
        except SignatureError as refused:
            log.warning("decision entry refused", extra={"entry": _text(entry_id), "error": str(refused)})
            client.xack(stream, group, entry_id)
            continue
        yield entry_id, event


# With partitions, resuming after an entry id restarts every partition this much earlier: ids of
# different partitions (different servers' clocks) do not order across them. Events seen twice
# are refused by the backend's SeenEvents (their event ids); none is missed.
RESUME_WINDOW_MS = int(CLOCK_SKEW_S * 1000)
# On a cluster a read cannot span partitions: a round that finds nothing blocks this long on one.
PARTITION_BLOCK_MS = 50


class DecisionReader:
    """Decision entries of every partition, each once, in entry-id order within a read.

    `after`: an entry id to resume after (None: only new decisions). On one stream that is
    exact; across partitions every partition resumes RESUME_WINDOW_MS before it (at least
    once: deduplicate by event id, as `verify_event(seen=…)` does)."""

    def __init__(self, client: redis.Redis, partitions: Partitions, after: str | None = None) -> None:
        self.client = client
        self.streams = partitions.streams("decisions")
        self._cluster = is_cluster(client)
        self._turn = 0
        if after is None:
            self.cursors = {s: self._tail(s) for s in self.streams}
        elif len(self.streams) == 1:
            self.cursors = {self.streams[0]: after}
        else:
            ms, _, _ = after.partition("-")
            self.cursors = {s: f"{max(int(ms) - RESUME_WINDOW_MS, 0)}-0" if int(ms) else after for s in self.streams}

    def _tail(self, stream: str) -> bytes | str:
        last = self.client.xrevrange(stream, count=1)
        return last[0][0] if last else "0-0"

    def read(self, block_ms: int = 1000, count: int = 100) -> list[tuple[bytes, dict]]:
        if len(self.streams) == 1 or not self._cluster:
            reply = self.client.xread(self.cursors, block=block_ms, count=count)
        else:
            pipe = self.client.pipeline(transaction=False)
            for stream, cursor in self.cursors.items():
                pipe.xread({stream: cursor}, count=count)
            reply = [r for replies in pipe.execute() for r in (replies or [])]
            if not reply and block_ms:
                self._turn = (self._turn + 1) % len(self.streams)
                stream = self.streams[self._turn]
                reply = self.client.xread(
                    {stream: self.cursors[stream]}, block=min(block_ms, PARTITION_BLOCK_MS), count=count
                )
        found = []
        for stream, items in reply or []:
            for entry_id, fields in items:
                self.cursors[_text(stream)] = entry_id
                found.append((entry_id, fields))
        return sorted(found, key=lambda item: tuple(int(x) for x in _text(item[0]).split("-")))


def consume_partitions(
    client: redis.Redis,
    partitions: Partitions,
    group: str,
    consumer: str,
    keys: Mapping[str, str],
    store_id: str,
    seen: SeenEvents | None = None,
    max_age_s: float | None = MAX_EVENT_AGE_S,
    block_ms: int = 1000,
    start: str = "$",
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, bytes, dict]]:
    """`consume` over every partition of the decisions stream: yields (stream, entry id, verified
    event); acknowledge each with XACK on that stream. The group exists on each partition, so
    a backend's replicas share the partitions without an event going to two of them. Returns
    once `stop` is set (a backend shutting down)."""
    seen = seen if seen is not None else SeenEvents()
    streams = partitions.streams("decisions")
    for stream in streams:
        _create_group(client, stream, group, start)
    turn = 0
    while stop is None or not stop.is_set():
        pipe = client.pipeline(transaction=False)
        for stream in streams:
            pipe.xreadgroup(group, consumer, {stream: ">"}, count=32)
        replies = [r for reply in pipe.execute() for r in (reply or [])]
        if not replies and block_ms:
            turn = (turn + 1) % len(streams)
            replies = (
                client.xreadgroup(
                    group, consumer, {streams[turn]: ">"}, count=32, block=min(block_ms, PARTITION_BLOCK_MS)
                )
                or []
            )
        for stream, items in replies:
            for entry_id, event in _verified(client, stream, group, items, keys, store_id, max_age_s, seen):
                yield _text(stream), entry_id, event


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
