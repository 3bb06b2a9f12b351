"""The stream-worker runtime every stage runs in.

Life of a worker, one screen:

    check the device → wait for Redis (startup_wait_s) → stage.start() → ensure consumer group → loop:
        reclaim entries left pending by dead consumers (XAUTOCLAIM), dead-letter the hopeless
        read a batch (XREADGROUP, up to batch_size entries or batch_wait_ms)
        decode → stage.process(batch) → write outputs + XACK in one MULTI/EXEC
        stage.tick() about once a second; refresh lag/pending gauges
    SIGTERM → finish the batch in hand → stage.stop()

Every turn of the loop beats a heartbeat, served to Kubernetes' probes (`facepay.runtime.health`)
and as the facepay_worker_heartbeat_age_seconds gauge.

Delivery is at least once: an entry is acknowledged in the same transaction that writes its
outputs, so a crash before that leaves it pending and another replica reclaims it. Outputs
that must exist once (payment decisions) are guarded by a check-and-set key in a Lua script.
A malformed entry goes straight to `{ns}:dead`; an entry whose processing keeps failing goes
there after `max_deliveries` failed attempts, with its last error, and the pipeline goes on.
Failures are counted per entry, not deliveries: entries reclaimed from a dead consumer are
processed one at a time, so a poison entry that kills its process is found alone and its
healthy batch mates never pay for it.

Redis refusing for now (full, read-only replica, loading, unreachable) is back-pressure: the
worker holds what it has in hand and retries with a bounded backoff; nothing is failed for it.
Trimming (retention, length bound) never passes the first entry a consumer group has not read
and acknowledged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis

from facepay.config import Settings
from facepay.keys import load_keyring
from facepay.messages import FIELD, MalformedMessage, Message, decode
from facepay.redaction import redact_url
from facepay.runtime import metrics
from facepay.runtime.envelope import Unauthenticated, open_entry, seal
from facepay.runtime.health import Heartbeat, serve_health
from facepay.runtime.redis_conn import Backoff, backpressure_kind, connect
from facepay.runtime.stage import Emit, Stage, StageBacklog
from facepay.runtime.startup import wait_for
from facepay.vocabulary import Purpose

log = logging.getLogger(__name__)
T = TypeVar("T")

# Write an entry only if its once-key is new; remember the entry id under the key.
# No MAXLEN here: an inline trim would drop decisions no backend has read (see _TRIM_SAFELY).
_EMIT_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return id
"""

# Trim a stream by MINID, never past the first entry some consumer group has not read and
# acknowledged (its oldest pending entry, else the entry after its last-delivered-id).
# ARGV: retention cut (ms), length bound, "1" if a stream without groups awaits one (a stage's
# input whose stage has not started: nothing in it has been read). Atomic, so no group moves
# between the look and the cut. Returns {entries trimmed, length after}.
_TRIM_SAFELY = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function successor(id)
  local ms, seq = parse(id)
  if seq >= 9007199254740991 then return id end  -- beyond exact arithmetic: keep that entry too
  return string.format('%.0f-%.0f', ms, seq + 1)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local safe = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local first_unprocessed = successor(info['last-delivered-id'])
  if info['pending'] > 0 then first_unprocessed = redis.call('XPENDING', KEYS[1], info['name'])[2] end
  if safe == nil or before(first_unprocessed, safe) then safe = first_unprocessed end
end
local before_length = redis.call('XLEN', KEYS[1])
local over = before_length > tonumber(ARGV[2])
if safe == nil and ARGV[3] == '1' then return {0, before_length} end
local cut = ARGV[1] .. '-0'
if safe == nil then
  redis.call('XTRIM', KEYS[1], 'MINID', cut)
  if over then redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[2]) end
else
  -- past the length bound, every processed entry goes; unread ones never do
  if over or before(safe, cut) then cut = safe end
  redis.call('XTRIM', KEYS[1], 'MINID', cut)
end
local after_length = redis.call('XLEN', KEYS[1])
return {before_length - after_length, after_length}
"""

BLOCK_MS = 1000
# Streams whose entries hold biometric data (face images, chips, embeddings): kept
# image_retention_s, not stream_retention_s.
IMAGE_STREAMS = ("frames", "faces", "aligned", "posed", "embeddings")
BACKPRESSURE_LOG_EVERY_S = 30.0


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
        # Fails here, at start-up, without this component's key: nothing unsigned is written.
        self.keys = load_keyring(settings.key_file, settings.trusted_keys_file, stage.name)
        self._signers = frozenset().union(*stage.accepts_from.values())
        self._stopping = False
        self._last_tick = self._last_reclaim = self._last_gauges = self._last_trim = 0.0
        self._backoff = Backoff()
        self._last_backpressure_log = 0.0
        self._written: set[str] = set()  # streams this worker wrote to: it trims them too
        # A pipe stage's output is the next stage's input: until that stage's group exists,
        # nothing in it has been read, so it is not trimmed.
        output = getattr(stage, "output", None)
        self._awaits_group = {settings.key(output)} if output else set()
        self.heartbeat = Heartbeat(settings.health_stale_s)
        metrics.HEARTBEAT_AGE.labels(self.group).set_function(self.heartbeat.age_s)

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        self._install_signal_handlers()
        # A GPU pod without its GPU fails here, loudly, before it touches the network.
        self._check_device()
        probes = serve_health(self.heartbeat, self.settings.health_port, self.settings.health_address)
        try:
            if not self._wait_for_redis():
                return  # asked to stop while waiting
            self.stage.start()
            try:
                self._until_accepted(lambda: self.redis.sadd(self.settings.key("workers", "ready"), self.consumer),
                                     "register worker")
                self.heartbeat.started()
                log.info("worker started", extra={"stage": self.group, "stream": self.stream, "consumer": self.consumer})
                while not self._stopping:
                    self.heartbeat.beat()
                    self.run_once()
            finally:
                self.stage.stop()
                log.info("worker stopped", extra={"stage": self.group, "consumer": self.consumer})
        finally:
            if probes:
                probes.close()

    def _check_device(self) -> None:
        """The device a model stage asked for (FACEPAY_DEVICE=cuda without CUDA raises
        DeviceUnavailableError), checked before anything else; torch only for stages with models."""
        if not self.stage.uses_device:
            return
        from facepay.models.device import resolve_device

        device = resolve_device(self.settings.device)
        log.info("device", extra={"stage": self.group, "requested": self.settings.device, "device": str(device)})

    def _wait_for_redis(self) -> bool:
        """Redis may come up after this worker (a pod scheduled first): wait startup_wait_s for it.
        False when asked to stop meanwhile."""
        where = redact_url(self.settings.redis_url)
        answered = wait_for(f"redis at {where}", self.redis.ping, lambda exc: backpressure_kind(exc) is not None,
                            self.settings.startup_wait_s, on_wait=self.heartbeat.waiting, stopping=lambda: self._stopping)
        if answered:
            self.heartbeat.redis_answered()
        return answered

    def stop(self) -> None:
        self._stopping = True

    def run_once(self) -> None:
        """One turn of the loop; Redis outages and refusals are waited out, never crash the worker."""
        try:
            self._ensure_group_once()
            self._maintenance()
            batch = self._read_batch()
            if batch:
                self._handle(batch)
        except StageBacklog as exc:  # only escapes while stopping: the batch stays pending
            log.info("stopping with a batch held back", extra={"stage": self.group, "error": str(exc)[:300]})
            return
        except redis.RedisError as exc:
            kind = backpressure_kind(exc)
            if kind is not None:  # (a group lost with the server's data shows up as NOGROUP)
                self._wait_out(kind, exc, "loop")
                return
            if "NOGROUP" not in str(exc):
                raise
            # The server lost the group (restarted without persistence): make it again.
            self._group_ready = False
            return
        self._resumed("loop")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a worker run in a thread (tests, tools) is stopped with stop()
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
            # A full server refuses XGROUP CREATE even when the group exists: look before waiting.
            if "BUSYGROUP" not in str(exc) and not (backpressure_kind(exc) == "oom" and self._group_exists()):
                raise
        self._group_ready = True

    def _group_exists(self) -> bool:
        return any(g["name"] in (self.group, self.group.encode()) for g in self.redis.xinfo_groups(self.stream))

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
        opened = [(entry, self._open_or_dead_letter(entry)) for entry in entries]
        good = [(entry, message) for entry, message in opened if message is not None]
        if not good:
            return
        started = time.perf_counter()
        try:
            emits = self._until_accepted(lambda: self.stage.process([m for _, m in good]), "stage",
                                         holding=[e.id for e, _ in good])
        except Exception as exc:
            if backpressure_kind(exc) or isinstance(exc, StageBacklog):
                raise  # stopping while held back: the batch stays pending, nothing failed
            # Find the entry that fails: retry one by one, so the rest of the batch goes on.
            if len(good) == 1:
                self._record_failure(*good[0])
                return
            for pair in good:
                self._handle_one(*pair)
            return
        metrics.STAGE_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        self._commit([e for e, _ in good], emits, erase=_not_kept(good))

    def _open_or_dead_letter(self, entry: Entry) -> Message | None:
        """The entry's message, or None once it is dead-lettered as unauthenticated or malformed."""
        try:
            return self._open(entry)
        except Unauthenticated as exc:
            metrics.UNAUTHENTICATED.labels(self.group).inc()
            self._dead_letter(entry, "unauthenticated", str(exc))
        except MalformedMessage as exc:
            self._dead_letter(entry, "malformed", str(exc))
        return None

    def _open(self, entry: Entry) -> Message:
        """Verify the signature before decoding, then the signer for the type, then the stage's
        own checks (a frame's origin); any failure is Unauthenticated."""
        signer, body = open_entry(entry.fields, self.stream, self.keys.trusted, self._signers)
        message = decode(body)
        if signer not in self.stage.accepts_from.get(message.TYPE, ()):
            raise Unauthenticated(f"{signer!r} may not send {message.TYPE!r} messages to {self.group}")
        problem = self.stage.refuse(message, self.keys.trusted)
        if problem:
            raise Unauthenticated(problem)
        return message

    def _handle_one(self, entry: Entry, message: Message) -> None:
        try:
            emits = self._until_accepted(lambda: self.stage.process([message]), "stage", holding=[entry.id])
        except Exception as exc:
            if backpressure_kind(exc) or isinstance(exc, StageBacklog):
                raise
            self._record_failure(entry, message)
            return
        self._commit([entry], emits, erase=_not_kept([(entry, message)]))

    def _record_failure(self, entry: Entry, message: Message) -> None:
        """Count a failed attempt and keep its error; the entry stays pending (retried after
        claim_idle_ms) until it fails max_deliveries times, then it is dead-lettered."""
        metrics.MESSAGES_FAILED.labels(self.group).inc()
        error = traceback.format_exc(limit=3)
        log.error("processing failed", extra={"stage": self.group, "entry": entry.id.decode(),
                                              "session_id": message.ref.session_id, "error": error})
        if self._count_failure(entry, error) >= self.settings.max_deliveries:
            self._dead_letter(entry, "max_deliveries", error)

    @property
    def _errors_key(self) -> str:
        return self.settings.key("errors", self.group)

    @staticmethod
    def _failure_fields(entry_id: bytes) -> tuple[bytes, bytes, bytes]:
        """In the errors hash: the entry's last error, its failure count, who processes it alone."""
        return entry_id, entry_id + b":failures", entry_id + b":alone"

    def _count_failure(self, entry: Entry, error: str) -> int:
        last_error, failures, alone = self._failure_fields(entry.id)

        def write() -> int:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(self._errors_key, failures, 1)
            pipe.hset(self._errors_key, last_error, error[-2000:])
            pipe.hdel(self._errors_key, alone)
            pipe.expire(self._errors_key, 7 * 24 * 3600)
            return int(pipe.execute()[0])

        return self._until_accepted(write, "count failure", holding=[entry.id])

    def _commit(self, entries: list[Entry], emits: list[Emit], erase: list[bytes] | None = None) -> None:
        """Write outputs and acknowledge inputs in one MULTI/EXEC transaction; a Redis that
        refuses for now (full, read-only, loading, unreachable) is waited out holding them.
        `erase`: input entries deleted once handled (enrollment photos, admin commands: `_not_kept`)."""
        self._until_accepted(lambda: self._write_commit(entries, emits, erase), "commit",
                             holding=[e.id for e in entries])

    def _write_commit(self, entries: list[Entry], emits: list[Emit], erase: list[bytes] | None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for emit in emits:
            stream = self.settings.key(emit.stream)
            fields = emit.payload if isinstance(emit.payload, dict) else {FIELD: emit.payload}
            if FIELD in fields:  # decision events carry their own HMAC signature instead
                fields = seal(fields, stream, self.keys.signer)
            if emit.once_key:
                flat = [x for kv in fields.items() for x in kv]
                # A replayed frame is either older than max_frame_age_s or meets this key.
                ttl = max(self.settings.stream_retention_s, self.settings.max_frame_age_s, 3600)
                pipe.eval(_EMIT_ONCE, 2, self.settings.key(emit.once_key), stream, ttl, *flat)
            else:
                pipe.xadd(stream, fields)  # trimmed by the maintenance pass, never unread entries
            self._written.add(stream)
        if entries:
            ids = [e.id for e in entries]
            pipe.xack(self.stream, self.group, *ids)
            pipe.hdel(self._errors_key, *[f for i in ids for f in self._failure_fields(i)])
        if erase:
            pipe.xdel(self.stream, *erase)
        pipe.execute()
        for emit in emits:
            metrics.MESSAGES_OUT.labels(self.group, emit.stream).inc()

    def _dead_letter(self, entry: Entry, reason: str, error: str) -> None:
        metrics.DEAD_LETTERS.labels(self.group, reason).inc()
        log.error("dead-lettered", extra={"stage": self.group, "entry": entry.id.decode(), "reason": reason, "error": error})
        fields = {b"stage": self.group.encode(), b"stream": self.stream.encode(), b"entry": entry.id,
                  b"reason": reason.encode(), b"error": error.encode()[-4000:], **_described(entry)}
        message = _decoded(entry)
        erase = message is not None and bool(_not_kept([(entry, message)]))

        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.settings.key("dead"), fields)  # trimmed by the maintenance pass
            pipe.xack(self.stream, self.group, entry.id)
            pipe.hdel(self._errors_key, *self._failure_fields(entry.id))
            if erase:
                pipe.xdel(self.stream, entry.id)
            pipe.execute()

        self._until_accepted(write, "dead letter", holding=[entry.id])

    # ---- back-pressure: Redis refusing for now -----------------------------------------------
    def _until_accepted(self, attempt: Callable[[], T], what: str, holding: Sequence[bytes] = ()) -> T:
        """Call attempt until Redis stops refusing (OOM, READONLY, LOADING, MASTERDOWN, down),
        waiting with a bounded backoff; re-raises only if the worker is asked to stop.
        `holding`: the pending entries in hand, kept ours meanwhile (see _keep_holding)."""
        last_refresh = time.monotonic()
        while True:
            try:
                result = attempt()
            except (redis.RedisError, StageBacklog) as exc:
                kind = "backlog" if isinstance(exc, StageBacklog) else backpressure_kind(exc)
                if kind is None or self._stopping:
                    raise
                # Holding entries: wake often enough to keep them ours (claim_idle_ms / 3).
                self._wait_out(kind, exc, what, self.settings.claim_idle_ms / 3000 if holding else None)
                if holding and time.monotonic() - last_refresh >= self.settings.claim_idle_ms / 3000:
                    last_refresh = time.monotonic()
                    self._keep_holding(holding)
                continue
            self._resumed(what)
            return result

    def _keep_holding(self, entry_ids: Sequence[bytes]) -> None:
        """Reset the idle time of the entries in hand (XCLAIM to ourselves, allowed on a full
        server), so that an idle replica does not reclaim a batch this worker is waiting to
        commit and process it a second time."""
        try:
            self.redis.xclaim(self.stream, self.group, self.consumer, 0, list(entry_ids), justid=True)
        except redis.RedisError as exc:
            log.debug("could not refresh entries in hand", extra={"stage": self.group, "error": str(exc)[:300]})

    def _wait_out(self, kind: str, exc: Exception, what: str, at_most_s: float | None = None) -> None:
        metrics.BACKPRESSURE.labels(self.group, kind).inc()
        self.heartbeat.waiting(f"{what}: {'a stage dependency' if kind == 'backlog' else 'redis'} {kind}")
        now = time.monotonic()
        if now - self._last_backpressure_log >= BACKPRESSURE_LOG_EVERY_S:
            self._last_backpressure_log = now
            log.warning("redis refuses for now; holding and retrying", extra={
                "stage": self.group, "kind": kind, "during": what, "error": str(exc)[:300], "retry_in_s": self._backoff.next_s})
        if kind == "readonly":
            # After a failover the address may lead to the new primary: reconnect, do not reuse.
            self.redis.connection_pool.disconnect()
        if kind == "oom" and now - self._last_trim >= 5.0:
            self._trim_freeing_memory()
        self._backoff.wait(at_most_s)

    def _resumed(self, what: str) -> None:
        self.heartbeat.redis_answered()
        waited = self._backoff.reset()
        if waited is not None:
            self._last_backpressure_log = 0.0
            log.info("redis accepts again; resuming", extra={"stage": self.group, "during": what, "waited_s": round(waited, 1)})

    def _trim_freeing_memory(self) -> None:
        """While Redis is full, trimming what every group has processed may free room."""
        self._last_trim = time.monotonic()
        try:
            self._trim_history()
        except redis.RedisError as exc:
            log.warning("trimming failed while redis is full", extra={"stage": self.group, "error": str(exc)[:300]})

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
        except Exception as exc:
            if backpressure_kind(exc):
                raise
            log.exception("stage tick failed", extra={"stage": self.group})
            return
        if emits:
            self._commit([], emits)

    def _reclaim(self) -> None:
        """Take over entries a dead or stuck consumer left pending and process them one at a time:
        after a crash, nothing tells which entry of the batch killed the process, so each gets
        its own attempt and a poison entry fails alone. Give up on hopeless ones."""
        start = "0-0"
        while not self._stopping:
            next_start, claimed, deleted = self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.settings.claim_idle_ms, start, count=self.settings.batch_size
            )
            if deleted:  # gone from the stream (erased): forget their failures
                self.redis.hdel(self._errors_key, *[f for i in deleted for f in self._failure_fields(i)])
            if claimed:
                metrics.RECLAIMED.labels(self.group).inc(len(claimed))
                log.info("reclaimed pending entries", extra={"stage": self.group, "count": len(claimed)})
                for entry in self._drop_hopeless(claimed):
                    self._handle_alone(entry)
            if next_start in (b"0-0", "0-0"):
                return
            start = next_start

    def _drop_hopeless(self, claimed: list) -> list[Entry]:
        """Count a failure for each entry whose consumer died (or stalled past claim_idle_ms)
        while processing it alone; dead-letter those that reached max_deliveries failures.
        Entries that were merely in a batch with it are not counted against."""
        keep = []
        for entry_id, fields in claimed:
            entry = Entry(entry_id, fields or {})
            holder = self.redis.hget(self._errors_key, self._failure_fields(entry_id)[2])
            if holder is not None:
                error = (f"consumer {holder.decode(errors='replace')} died or stalled past claim_idle_ms "
                         "while processing it alone")
                if self._count_failure(entry, error) >= self.settings.max_deliveries:
                    self._dead_letter(entry, "max_deliveries", error)
                    continue
            keep.append(entry)
        return keep

    def _handle_alone(self, entry: Entry) -> None:
        metrics.MESSAGES_IN.labels(self.group).inc()
        # Verified like any read entry: a crash must not be a way around the signature check.
        message = self._open_or_dead_letter(entry)
        if message is None:
            return
        # Marked first: if this process dies now, the next reclaimer knows this entry did it.
        alone = self._failure_fields(entry.id)[2]
        self._until_accepted(lambda: self.redis.hset(self._errors_key, alone, self.consumer), "mark", holding=[entry.id])
        self._handle_one(entry, message)

    def _update_gauges(self) -> None:
        for group in self.redis.xinfo_groups(self.stream):
            if group["name"] in (self.group, self.group.encode()):
                metrics.GROUP_LAG.labels(self.group, self.stream).set(group.get("lag") or 0)
                metrics.GROUP_PENDING.labels(self.group, self.stream).set(group.get("pending") or 0)

    def _trim_history(self) -> None:
        """Keep image_retention_s of history in the streams that carry face images or chips
        (biometric data: exactly, not by whole stream nodes), stream_retention_s in the others
        (decisions, replies), and at most stream_maxlen entries, in every stream this worker
        reads or writes, never trimming an entry some consumer group has not read and
        acknowledged. Unread entries past the bound are back-pressure (the gateway refuses new
        frames), not something to drop."""
        self._ensure_group_once()  # our own input counts as unread until our group exists
        now_ms = int(time.time() * 1000)
        for stream in sorted({self.stream, self.settings.key("dead"), *self._written}):
            oldest_ms = max(now_ms - self._retention_s(stream) * 1000, 0)
            awaits_group = "1" if stream in self._awaits_group else "0"
            trimmed, length = self.redis.eval(_TRIM_SAFELY, 1, stream, oldest_ms, self.settings.stream_maxlen, awaits_group)
            metrics.STREAM_LENGTH.labels(stream).set(length)
            if length > self.settings.stream_maxlen:
                log.warning("stream past its length bound with entries not yet processed; kept (back-pressure)",
                            extra={"stage": self.group, "stream": stream, "length": length,
                                   "bound": self.settings.stream_maxlen, "trimmed": trimmed})

    def _retention_s(self, stream: str) -> int:
        carries_faces = stream in {self.settings.key(name) for name in IMAGE_STREAMS}
        return self.settings.image_retention_s if carries_faces else self.settings.stream_retention_s


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
    return [e.id for e, m in pairs if m.ref.purpose == Purpose.ENROLL or m.TYPE == "admin"]
