"""The stream-worker runtime every stage runs in.

Life of a worker, one screen:

    start → ensure consumer group → loop:
        reclaim entries left pending by dead consumers (XAUTOCLAIM), dead-letter the hopeless
        read a batch (XREADGROUP, up to batch_size entries or batch_wait_ms)
        decode → stage.process(batch) → write outputs + XACK in one MULTI/EXEC
        stage.tick() about once a second; refresh lag/pending gauges
    SIGTERM → finish the batch in hand → stage.stop()

Delivery is at least once: an entry is acknowledged in the same transaction that writes its
outputs, so a crash before that leaves it pending and another replica reclaims it. Outputs
that must exist once (payment decisions) are guarded by a check-and-set key in a Lua script.
A malformed entry goes straight to `{ns}:dead`; an entry whose processing keeps failing goes
there after `max_deliveries` attempts, with its last error, and the pipeline goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass

import redis

from facepay.config import Settings
from facepay.messages import FIELD, MalformedMessage, Message, decode
from facepay.runtime import metrics
from facepay.runtime.redis_conn import TRANSIENT, connect, with_retry
from facepay.runtime.stage import Emit, Stage

log = logging.getLogger(__name__)

# Write an entry only if its once-key is new; remember the entry id under the key.
_EMIT_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return id
"""

BLOCK_MS = 1000


@dataclass
class Entry:
    id: bytes
    fields: dict[bytes, bytes]


class StreamWorker:
    def __init__(self, stage: Stage, settings: Settings, consumer: str | None = None) -> None:
        self.stage = stage
        self.settings = settings
        # A stable name per replica (the pod name in Kubernetes) lets a restarted replica
        # find its own pending entries; the hostname-pid default is unique per process.
        self.consumer = consumer or os.environ.get("FACEPAY_CONSUMER") or f"{socket.gethostname()}-{os.getpid()}"
        self.stream = settings.key(stage.input)
        self.group = stage.name
        self.redis = connect(settings.redis_url, BLOCK_MS)
        self._stopping = False
        self._last_tick = self._last_reclaim = self._last_gauges = self._last_trim = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        self._install_signal_handlers()
        self.stage.start()
        with_retry(lambda: self.redis.sadd(self.settings.key("workers", "ready"), self.consumer), "register worker")
        log.info("worker started", extra={"stage": self.group, "stream": self.stream, "consumer": self.consumer})
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self.stage.stop()
            log.info("worker stopped", extra={"stage": self.group, "consumer": self.consumer})

    def stop(self) -> None:
        self._stopping = True

    def run_once(self) -> None:
        """One turn of the loop; Redis outages are waited out here, never crash the worker."""
        try:
            self._ensure_group_once()
            self._maintenance()
            batch = self._read_batch()
            if batch:
                self._handle(batch)
        except TRANSIENT as exc:
            log.warning("redis unavailable; will retry", extra={"stage": self.group, "error": str(exc)})
            self._group_ready = False
            time.sleep(0.5)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The server lost the group (restarted without persistence): make it again.
            self._group_ready = False

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # ---- reading ---------------------------------------------------------------------------
    _group_ready = False

    def _ensure_group_once(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read_batch(self) -> list[Entry]:
        """Up to batch_size entries: block for the first, then wait at most batch_wait_ms."""
        size, wait_s = self.settings.batch_size, self.settings.batch_wait_ms / 1000
        entries = self._xreadgroup(size, BLOCK_MS)
        deadline = time.monotonic() + wait_s
        while entries and len(entries) < size and (left := deadline - time.monotonic()) > 0:
            more = self._xreadgroup(size - len(entries), max(1, int(left * 1000)))
            if not more:
                break
            entries += more
        return entries

    def _xreadgroup(self, count: int, block_ms: int) -> list[Entry]:
        reply = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        return [Entry(eid, fields) for _, items in (reply or []) for eid, fields in items]

    # ---- processing ------------------------------------------------------------------------
    def _handle(self, entries: list[Entry]) -> None:
        metrics.MESSAGES_IN.labels(self.group).inc(len(entries))
        metrics.BATCH_SIZE.labels(self.group).observe(len(entries))
        good: list[tuple[Entry, Message]] = []
        for entry in entries:
            try:
                good.append((entry, decode(entry.fields.get(FIELD, b""))))
            except MalformedMessage as exc:
                self._dead_letter(entry, "malformed", str(exc))
        if not good:
            return
        started = time.perf_counter()
        try:
            emits = self.stage.process([m for _, m in good])
        except TRANSIENT:
            raise
        except Exception:
            # Find the entry that fails: retry one by one, so the rest of the batch goes on.
            if len(good) == 1:
                self._record_failure(*good[0])
                return
            for pair in good:
                self._handle_one(*pair)
            return
        metrics.STAGE_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        self._commit([e for e, _ in good], emits, erase=_not_kept(good))

    def _handle_one(self, entry: Entry, message: Message) -> None:
        try:
            emits = self.stage.process([message])
        except TRANSIENT:
            raise
        except Exception:
            self._record_failure(entry, message)
            return
        self._commit([entry], emits, erase=_not_kept([(entry, message)]))

    def _record_failure(self, entry: Entry, message: Message) -> None:
        """Leave the entry pending (it is retried after claim_idle_ms) and keep its error."""
        metrics.MESSAGES_FAILED.labels(self.group).inc()
        error = traceback.format_exc(limit=3)
        log.error("processing failed", extra={"stage": self.group, "entry": entry.id.decode(),
                                              "session_id": message.ref.session_id, "error": error})
        self.redis.hset(self._errors_key, entry.id, error[-2000:])
        self.redis.expire(self._errors_key, 7 * 24 * 3600)

    @property
    def _errors_key(self) -> str:
        return self.settings.key("errors", self.group)

    def _commit(self, entries: list[Entry], emits: list[Emit], erase: list[bytes] | None = None) -> None:
        """Write outputs and acknowledge inputs in one MULTI/EXEC transaction; `erase`: input
        entries deleted once handled (enrollment photos, admin commands: see `_not_kept`)."""
        pipe = self.redis.pipeline(transaction=True)
        for emit in emits:
            stream = self.settings.key(emit.stream)
            fields = emit.payload if isinstance(emit.payload, dict) else {FIELD: emit.payload}
            if emit.once_key:
                flat = [x for kv in fields.items() for x in kv]
                ttl = max(self.settings.stream_retention_s, 3600)
                pipe.eval(_EMIT_ONCE, 2, self.settings.key(emit.once_key), stream, ttl, self.settings.stream_maxlen, *flat)
            else:
                pipe.xadd(stream, fields, maxlen=self.settings.stream_maxlen, approximate=True)
            metrics.MESSAGES_OUT.labels(self.group, emit.stream).inc()
        if entries:
            ids = [e.id for e in entries]
            pipe.xack(self.stream, self.group, *ids)
            pipe.hdel(self._errors_key, *ids)
        if erase:
            pipe.xdel(self.stream, *erase)
        pipe.execute()

    def _dead_letter(self, entry: Entry, reason: str, error: str) -> None:
        metrics.DEAD_LETTERS.labels(self.group, reason).inc()
        log.error("dead-lettered", extra={"stage": self.group, "entry": entry.id.decode(), "reason": reason, "error": error})
        fields = {b"stage": self.group.encode(), b"stream": self.stream.encode(), b"entry": entry.id,
                  b"reason": reason.encode(), b"error": error.encode()[-4000:], **_described(entry)}
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.settings.key("dead"), fields, maxlen=self.settings.stream_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, entry.id)
        pipe.hdel(self._errors_key, entry.id)
        message = _decoded(entry)
        if message is not None and _not_kept([(entry, message)]):
            pipe.xdel(self.stream, entry.id)
        pipe.execute()

    # ---- maintenance: reclaim, tick, gauges, trimming --------------------------------------
    def _maintenance(self) -> None:
        now = time.monotonic()
        if now - self._last_reclaim >= max(self.settings.claim_idle_ms / 2000, 0.2):
            self._last_reclaim = now
            self._reclaim()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self._tick()
        if now - self._last_gauges >= 5.0:
            self._last_gauges = now
            self._update_gauges()
        if now - self._last_trim >= 60.0:
            self._last_trim = now
            self._trim_history()

    def _tick(self) -> None:
        """The stage's periodic work; its failure is logged, and the loop goes on."""
        try:
            emits = self.stage.tick()
        except TRANSIENT:
            raise
        except Exception:
            log.exception("stage tick failed", extra={"stage": self.group})
            return
        if emits:
            self._commit([], emits)

    def _reclaim(self) -> None:
        """Take over entries a dead or stuck consumer left pending; give up on hopeless ones."""
        start = "0-0"
        while True:
            next_start, claimed, _deleted = self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.settings.claim_idle_ms, start, count=self.settings.batch_size
            )
            if claimed:
                metrics.RECLAIMED.labels(self.group).inc(len(claimed))
                log.info("reclaimed pending entries", extra={"stage": self.group, "count": len(claimed)})
                self._handle([e for e in self._drop_hopeless(claimed)])
            if next_start in (b"0-0", "0-0"):
                return
            start = next_start

    def _drop_hopeless(self, claimed: list) -> list[Entry]:
        keep = []
        for entry_id, fields in claimed:
            entry = Entry(entry_id, fields or {})
            info = self.redis.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            deliveries = info[0]["times_delivered"] if info else 1
            if deliveries > self.settings.max_deliveries:
                error = self.redis.hget(self._errors_key, entry_id) or b"consumer died while processing it"
                self._dead_letter(entry, "max_deliveries", error.decode(errors="replace"))
            else:
                keep.append(entry)
        return keep

    def _update_gauges(self) -> None:
        for group in self.redis.xinfo_groups(self.stream):
            if group["name"] in (self.group, self.group.encode()):
                metrics.GROUP_LAG.labels(self.group, self.stream).set(group.get("lag") or 0)
                metrics.GROUP_PENDING.labels(self.group, self.stream).set(group.get("pending") or 0)

    def _trim_history(self) -> None:
        """Keep image_retention_s of history (every stage input holds face images or chips);
        older entries go — exactly, not by whole stream nodes, so none outlives the promise."""
        oldest_ms = int(time.time() * 1000) - self.settings.image_retention_s * 1000
        self.redis.xtrim(self.stream, minid=f"{max(oldest_ms, 0)}-0", approximate=False)


def _decoded(entry: Entry) -> Message | None:
    try:
        return decode(entry.fields.get(FIELD, b""))
    except MalformedMessage:
        return None


def _described(entry: Entry) -> dict[bytes, bytes]:
    """What a dead letter keeps of its entry: which frame it was (type, FrameRef), its size and
    digest — never its bytes, which are face images and chips (biometric data, item 11)."""
    body = entry.fields.get(FIELD, b"")
    described = {b"bytes": str(sum(len(v) for v in entry.fields.values())).encode(),
                 b"sha256": hashlib.sha256(body).hexdigest().encode(),
                 b"fields": b",".join(sorted(entry.fields))}
    message = _decoded(entry)
    if message is not None:
        described[b"type"] = message.TYPE.encode()
        described[b"ref"] = json.dumps(dataclasses.asdict(message.ref)).encode()
    return described


def _not_kept(pairs: list[tuple[Entry, Message]]) -> list[bytes]:
    """Entries erased from the input stream once handled: enrollment photos and chips, and
    operator commands (a re-index carries embeddings). Payment frames stay for the retention
    period (audit replay); enrollment has no such use, and a deleted user must leave nothing."""
    return [e.id for e, m in pairs if m.ref.purpose == "enroll" or m.TYPE == "admin"]
