"""The stream-worker runtime every stage runs in.

Life of a worker, one screen:

    check the device → wait for Redis (startup_wait_s) → stage.start() → ensure consumer group → loop:
        reclaim entries left pending by dead consumers (XAUTOCLAIM), dead-letter the hopeless
        read a batch (XREADGROUP, up to batch_size entries or batch_wait_ms)
        decode → stage.process(batch) → write outputs + XACK in one MULTI/EXEC
        stage.tick() about once a second; refresh lag/pending gauges
    SIGTERM → finish the batch in hand → stage.stop(); during a start-up wait → stop at once

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

A stage may defer one entry for a reason of its own (`EntryDeferred`: the archive has no key
for its tenant yet): it stays pending, uncounted, and is tried again once idle; the others go on.

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
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from facepay.config import Settings
from facepay.keys import load_keyring
from facepay.messages import FIELD, MalformedMessage, Message, decode
from facepay.redaction import redact_url
from facepay.runtime import metrics
from facepay.runtime.envelope import Unauthenticated, open_entry, seal
from facepay.runtime.health import Heartbeat, serve_health
from facepay.runtime.partitions import PARTITIONED_STREAMS, Partitions, per_partition
from facepay.runtime.redis_conn import (
    REDIS_ERRORS,
    Backoff,
    backpressure_kind,
    command_recorder,
    connect,
    is_cluster,
    recorded,
    replicated,
    reset_connections,
)
from facepay.runtime.stage import Emit, EntryDeferred, Stage, StageBacklog, StageContractError
from facepay.runtime.startup import StopRequested, stop_requests, wait_for
from facepay.vocabulary import Purpose

log = logging.getLogger(__name__)
T = TypeVar("T")

# A deferred entry not deferred again by this worker within this many claim_idle_ms (+5 s) is
# forgotten: another replica reclaimed it (and counts it now) or acknowledged it.
DEFERRED_FORGET_CLAIMS = 2

# Write an entry (and the entries written beside it, Emit.beside) only if its once-key is new;
# remember the first entry's id under the key. KEYS: once-key, then each entry's stream (one
# slot: the session's partition). ARGV: ttl, then per entry its number of field arguments and
# those arguments. No MAXLEN here: an inline trim would drop decisions no backend has read (see
# _TRIM_SAFELY).
_EMIT_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local at, first = 2, nil
for i = 2, #KEYS do
  local n = tonumber(ARGV[at])
  local id = redis.call('XADD', KEYS[i], '*', unpack(ARGV, at + 1, at + n))
  first = first or id
  at = at + n + 1
end
redis.call('SET', KEYS[1], first, 'EX', ARGV[1])
return first
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
# On a cluster one XREADGROUP cannot span partitions (slots): when a round over every partition
# finds nothing, the worker blocks this long on one of them (in turn) before the next round.
PARTITION_BLOCK_MS = 50
# Streams whose entries hold biometric data (face images, chips, embeddings): kept
# image_retention_s, not stream_retention_s.
IMAGE_STREAMS = ("frames", "faces", "aligned", "posed", "embeddings")
BACKPRESSURE_LOG_EVERY_S = 30.0


@dataclass
class Entry:
    id: bytes
    fields: dict[bytes, bytes]
    stream: str = ""  # the (partition) stream it was read from


class StreamWorker:
    def __init__(self, stage: Stage, settings: Settings, consumer: str | None = None) -> None:
        self.stage = stage
        self.settings = settings
        # A stable name per replica (the pod name in Kubernetes) lets a restarted replica
        # find its own pending entries; the hostname-pid default is unique per process.
        self.consumer = consumer or os.environ.get("FACEPAY_CONSUMER") or f"{socket.gethostname()}-{os.getpid()}"
        self.partitions = Partitions.of(settings)
        # Every partition of the input stream: replicas share them through the consumer group
        # each partition stream has (cooperative, no entry to two replicas at once).
        self.streams = self.partitions.streams(stage.input)
        self.stream = self.streams[0]
        self.group = stage.name
        self.redis = connect(settings.redis_url, BLOCK_MS)
        self._cluster = is_cluster(self.redis)
        self._turn = 0  # which partition a blocking read waits on next (cluster)
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
        self._awaits_group = set(self.partitions.streams(output)) if output else set()
        self.heartbeat = Heartbeat(settings.health_stale_s)
        # Entries this worker deferred (EntryDeferred): (stream, id) → (reason, scope, when last
        # deferred); forgotten once acknowledged, dead-lettered, or not deferred again for
        # DEFERRED_FORGET_CLAIMS × claim_idle_ms (another replica took it, or acknowledged it).
        self._deferred: dict[tuple[str, bytes], tuple[str, str, float]] = {}
        self._deferred_series: set[tuple[str, str]] = set()
        metrics.HEARTBEAT_AGE.labels(self.group).set_function(self.heartbeat.age_s)

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        self._install_signal_handlers()
        # A GPU pod without its GPU fails here, loudly, before it touches the network.
        self._check_device()
        probes = serve_health(self.heartbeat, self.settings.health_port, self.settings.health_address)
        try:
            try:
                # Every start-up wait (Redis here, a stage's own: the recognizer's Qdrant server)
                # ends at once on SIGTERM: a pod deleted before its services came up stops cleanly.
                with stop_requests(lambda: self._stopping):
                    self._wait_for_redis()
                    self.stage.start()
            except StopRequested:
                log.info("worker stopped during start-up", extra={"stage": self.group, "consumer": self.consumer})
                return
            try:
                if not self._register():
                    return  # asked to stop while Redis refused the registration
                self.heartbeat.started()
                log.info(
                    "worker started", extra={"stage": self.group, "stream": self.stream, "consumer": self.consumer}
                )
                while not self._stopping:
                    self.heartbeat.beat()
                    self.run_once()
            finally:
                self.stage.stop()
                log.info("worker stopped", extra={"stage": self.group, "consumer": self.consumer})
        finally:
            if probes:
                probes.close()

    def _register(self) -> bool:
        """The last step of start-up, waited out while Redis refuses it; False when asked to
        stop meanwhile (a normal stop, as during the start-up waits)."""
        try:
            self._until_accepted(
                lambda: self.redis.sadd(self.settings.key("workers", "ready"), self.consumer), "register worker"
            )
        except REDIS_ERRORS as exc:
            if not self._stopping or backpressure_kind(exc) is None:
                raise
            return False
        return True

    def _check_device(self) -> None:
        """The device a model stage asked for (FACEPAY_DEVICE=cuda without CUDA raises
        DeviceUnavailableError), checked before anything else; torch only for stages with models."""
        if not self.stage.uses_device:
            return
        from facepay.models.device import resolve_device

        device = resolve_device(self.settings.device)
        log.info("device", extra={"stage": self.group, "requested": self.settings.device, "device": str(device)})

    def _wait_for_redis(self) -> None:
        """Redis may come up after this worker (a pod scheduled first): wait startup_wait_s for it.
        StopRequested when asked to stop meanwhile."""
        where = redact_url(self.settings.redis_url)
        wait_for(
            f"redis at {where}",
            self.redis.ping,
            lambda exc: backpressure_kind(exc) is not None,
            self.settings.startup_wait_s,
            on_wait=self.heartbeat.waiting,
        )
        self.heartbeat.redis_answered()

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
        except REDIS_ERRORS as exc:
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
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                # A full server refuses XGROUP CREATE even when the group exists: look before waiting.
                if "BUSYGROUP" not in str(exc) and not (backpressure_kind(exc) == "oom" and self._group_exists(stream)):
                    raise
        self._group_ready = True

    def _group_exists(self, stream: str) -> bool:
        return any(g["name"] in (self.group, self.group.encode()) for g in self.redis.xinfo_groups(stream))

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
        if len(self.streams) == 1:
            return self._read({self.stream: ">"}, count, block_ms)
        # A round over every partition (on a cluster pipelined, one round trip per node), then,
        # if it brought nothing, a blocking wait: on one server over every partition at once,
        # on a cluster on one partition in turn (a read cannot span slots).
        entries = self._read_round(per_partition(count, len(self.streams)))
        if entries or not block_ms:
            return entries
        if not self._cluster:
            return self._read(dict.fromkeys(self.streams, ">"), per_partition(count, len(self.streams)), block_ms)
        self._turn = (self._turn + 1) % len(self.streams)
        return self._read({self.streams[self._turn]: ">"}, count, min(block_ms, PARTITION_BLOCK_MS))

    def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> list[Entry]:
        reply = self.redis.xreadgroup(self.group, self.consumer, streams, count=count, block=block_ms)
        return _entries(reply)

    def _read_round(self, count: int) -> list[Entry]:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xreadgroup(self.group, self.consumer, {stream: ">"}, count=count)
        return [entry for reply in pipe.execute() for entry in _entries(reply)]

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
            emits = self._until_accepted(
                lambda: self.stage.process([m for _, m in good]), "stage", holding=[e for e, _ in good]
            )
        except Exception as exc:
            if backpressure_kind(exc) or isinstance(exc, StageBacklog):
                raise  # stopping while held back: the batch stays pending, nothing failed
            # Find the entry that fails (or is deferred): retry one by one, so the rest of the
            # batch goes on.
            if len(good) == 1:
                self._failed_or_deferred(*good[0], exc)
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
        signer, body = open_entry(entry.fields, entry.stream or self.stream, self.keys.trusted, self._signers)
        message = decode(body)
        if signer not in self.stage.accepts_from.get(message.TYPE, ()):
            raise Unauthenticated(f"{signer!r} may not send {message.TYPE!r} messages to {self.group}")
        problem = self.stage.refuse(message, self.keys.trusted)
        if problem:
            raise Unauthenticated(problem)
        return message

    def _handle_one(self, entry: Entry, message: Message) -> None:
        try:
            emits = self._until_accepted(lambda: self.stage.process([message]), "stage", holding=[entry])
        except Exception as exc:
            if backpressure_kind(exc) or isinstance(exc, StageBacklog):
                raise
            self._failed_or_deferred(entry, message, exc)
            return
        self._commit([entry], emits, erase=_not_kept([(entry, message)]))

    def _failed_or_deferred(self, entry: Entry, message: Message, exc: Exception) -> None:
        if isinstance(exc, EntryDeferred):
            self._defer(entry, message, exc)
        else:
            self._record_failure(entry, message)

    def _defer(self, entry: Entry, message: Message, deferred: EntryDeferred) -> None:
        """The stage cannot process this entry for now, for a reason of its own (EntryDeferred):
        it stays pending, unacknowledged and uncounted, and is reclaimed once idle. Its "being
        processed alone" mark goes, or the next reclaim would count a crash against it."""
        metrics.DEFERRED.labels(self.group).inc()
        self._deferred[(entry.stream or self.stream, entry.id)] = (deferred.reason, deferred.scope, time.monotonic())
        self._publish_deferred()
        log.debug(
            "entry deferred by the stage",
            extra={
                "stage": self.group,
                "entry": entry.id.decode(),
                "session_id": message.ref.session_id,
                "error": str(deferred)[:300],
            },
        )
        errors, alone = self._errors_key(entry), self._failure_fields(entry.id)[2]
        self._until_accepted(lambda: self.redis.hdel(errors, alone), "defer", holding=[entry])

    def _record_failure(self, entry: Entry, message: Message) -> None:
        """Count a failed attempt and keep its error; the entry stays pending (retried after
        claim_idle_ms) until it fails max_deliveries times, then it is dead-lettered."""
        metrics.MESSAGES_FAILED.labels(self.group).inc()
        error = traceback.format_exc(limit=3)
        log.error(
            "processing failed",
            extra={
                "stage": self.group,
                "entry": entry.id.decode(),
                "session_id": message.ref.session_id,
                "error": error,
            },
        )
        if self._count_failure(entry, error) >= self.settings.max_deliveries:
            self._dead_letter(entry, "max_deliveries", error)

    def _errors_key(self, entry: Entry) -> str:
        """Failures of the entries of one input (partition) stream, in that partition's slot."""
        return self.partitions.sibling(entry.stream or self.stream, "errors", self.group)

    @staticmethod
    def _failure_fields(entry_id: bytes) -> tuple[bytes, bytes, bytes]:
        """In the errors hash: the entry's last error, its failure count, who processes it alone."""
        return entry_id, entry_id + b":failures", entry_id + b":alone"

    def _count_failure(self, entry: Entry, error: str) -> int:
        last_error, failures, alone = self._failure_fields(entry.id)

        errors = self._errors_key(entry)

        def write() -> int:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(errors, failures, 1)
            pipe.hset(errors, last_error, error[-2000:])
            pipe.hdel(errors, alone)
            pipe.expire(errors, 7 * 24 * 3600)
            return int(pipe.execute()[0])

        return self._until_accepted(write, "count failure", holding=[entry])

    def _commit(self, entries: list[Entry], emits: list[Emit], erase: list[bytes] | None = None) -> None:
        """Write outputs and acknowledge inputs in one MULTI/EXEC transaction; a Redis that
        refuses for now (full, read-only, loading, unreachable) is waited out holding them.
        `erase`: input entries deleted once handled (enrollment photos, admin commands: `_not_kept`)."""
        self._until_accepted(lambda: self._write_commit(entries, emits, erase), "commit", holding=entries)

    def _write_commit(self, entries: list[Entry], emits: list[Emit], erase: list[bytes] | None) -> None:
        ops: list[_Op] = []
        for emit in emits:
            stream, once_key = self._emit_keys(emit)
            written = [(stream, self._fields(emit, stream))]
            for beside in emit.beside:
                if beside.once_key or beside.beside or beside.partition_key != emit.partition_key:
                    raise StageContractError(
                        f"stage {self.group!r}: an entry written beside another shares its session and once-key"
                    )
                other = self._emit_keys(beside)[0]
                written.append((other, self._fields(beside, other)))
            if once_key:
                # A replayed frame is either older than max_frame_age_s or meets this key.
                ttl = max(self.settings.stream_retention_s, self.settings.max_frame_age_s, 3600)
                args: list[object] = [ttl]
                for _, fields in written:
                    args += [2 * len(fields), *(x for kv in fields.items() for x in kv)]
                streams = [s for s, _ in written]
                ops.append(
                    _Op(
                        stream,
                        lambda pipe, k=once_key, ss=streams, a=args: pipe.execute_command(
                            "EVAL", _EMIT_ONCE, 1 + len(ss), k, *ss, *a
                        ),
                    )
                )
            else:  # trimmed by the maintenance pass, never unread entries
                for s, fields in written:
                    ops.append(_Op(s, lambda pipe, s=s, f=fields: pipe.xadd(s, f)))
            self._written.update(s for s, _ in written)
        erased = set(erase or ())
        for stream, batch in _by_stream(entries).items():
            ids = [e.id for e in batch]
            errors = self._errors_key(batch[0])
            gone = [i for i in ids if i in erased]
            ops.append(_Op(stream, lambda pipe, s=stream, i=ids: pipe.xack(s, self.group, *i), acknowledges=True))
            ops.append(
                _Op(
                    stream, lambda pipe, e=errors, i=ids: pipe.hdel(e, *[f for x in i for f in self._failure_fields(x)])
                )
            )
            if gone:
                ops.append(_Op(stream, lambda pipe, s=stream, g=gone: pipe.xdel(s, *g)))
        self._transact(ops)
        for emit in emits:
            for written_emit in (emit, *emit.beside):
                metrics.MESSAGES_OUT.labels(self.group, written_emit.stream).inc()
        self._undefer(entries)

    def _fields(self, emit: Emit, stream: str) -> dict[bytes, bytes]:
        """An emit's stream fields: a message (`m`) signed by this component for `stream`;
        decision events carry their own HMAC signature instead."""
        fields = emit.payload if isinstance(emit.payload, dict) else {FIELD: emit.payload}
        return seal(fields, stream, self.keys.signer) if FIELD in fields else fields

    def _dead_letter(self, entry: Entry, reason: str, error: str) -> None:
        metrics.DEAD_LETTERS.labels(self.group, reason).inc()
        log.error(
            "dead-lettered", extra={"stage": self.group, "entry": entry.id.decode(), "reason": reason, "error": error}
        )
        fields = {
            b"stage": self.group.encode(),
            b"stream": (entry.stream or self.stream).encode(),
            b"entry": entry.id,
            b"reason": reason.encode(),
            b"error": error.encode()[-4000:],
            **_described(entry),
        }
        message = _decoded(entry)
        erase = message is not None and bool(_not_kept([(entry, message)]))

        stream, dead, errors = entry.stream or self.stream, self.settings.key("dead"), self._errors_key(entry)
        ops = [
            _Op(dead, lambda pipe: pipe.xadd(dead, fields)),  # trimmed by the maintenance pass
            _Op(stream, lambda pipe: pipe.xack(stream, self.group, entry.id), acknowledges=True),
            _Op(stream, lambda pipe: pipe.hdel(errors, *self._failure_fields(entry.id))),
        ]
        if erase:
            ops.append(_Op(stream, lambda pipe: pipe.xdel(stream, entry.id)))
        self._until_accepted(lambda: self._transact(ops), "dead letter", holding=[entry])
        self._undefer([entry])

    def _undefer(self, entries: Sequence[Entry]) -> None:
        """Acknowledged (or dead-lettered) entries are no longer deferred."""
        if self._deferred and any(
            self._deferred.pop((e.stream or self.stream, e.id), None) is not None for e in list(entries)
        ):
            self._publish_deferred()

    def _publish_deferred(self) -> None:
        """facepay_deferred_entries and facepay_deferred_oldest_seconds per reason and scope, and
        the same in /readyz's body; entries not deferred again for a while are forgotten."""
        now, forget_s = time.monotonic(), DEFERRED_FORGET_CLAIMS * self.settings.claim_idle_ms / 1000 + 5
        for key in [k for k, (_, _, at) in self._deferred.items() if now - at > forget_s]:
            del self._deferred[key]
        now_ms = time.time() * 1000
        held: dict[tuple[str, str], list[float]] = {}
        for (_stream, entry_id), (reason, scope, _) in self._deferred.items():
            written_ms = int(entry_id.split(b"-", 1)[0])
            held.setdefault((reason, scope), []).append(max(0.0, (now_ms - written_ms) / 1000))
        for reason, scope in self._deferred_series - held.keys():
            metrics.DEFERRED_ENTRIES.remove(self.group, reason, scope)
            metrics.DEFERRED_OLDEST.remove(self.group, reason, scope)
        summary = []
        for (reason, scope), ages in sorted(held.items()):
            metrics.DEFERRED_ENTRIES.labels(self.group, reason, scope).set(len(ages))
            metrics.DEFERRED_OLDEST.labels(self.group, reason, scope).set(max(ages))
            summary.append(
                {
                    "stage": self.group,
                    "reason": reason,
                    "scope": scope,
                    "entries": len(ages),
                    "oldest_s": round(max(ages)),
                }
            )
        self._deferred_series = set(held)
        self.heartbeat.deferring(summary)

    def _emit_keys(self, emit: Emit) -> tuple[str, str | None]:
        """The stream an emit goes to and its once-key: a session's partition for partitioned streams."""
        if emit.stream not in PARTITIONED_STREAMS or not self.partitions.tagged:
            return self.settings.key(emit.stream), emit.once_key and self.settings.key(emit.once_key)
        if emit.partition_key is None:
            raise StageContractError(
                f"stage {self.group!r}: an entry for the partitioned stream {emit.stream!r} "
                "names no session (Emit.partition_key)"
            )
        stream = self.partitions.stream(emit.stream, emit.partition_key)
        return stream, emit.once_key and self.partitions.session_key(emit.partition_key, emit.once_key)

    def _transact(self, ops: list[_Op]) -> None:
        """Run ops in one MULTI/EXEC. On a cluster a transaction holds one hash slot: one per slot,
        the input's (acknowledgements) last, so an acknowledged entry's outputs are written. A
        pipe stage's outputs share its input's slot (same partition): written and acknowledged
        atomically; only global streams (dead letters, admin replies) go just before."""
        by_slot: dict[int, list[_Op]] = {}
        for op in ops:
            by_slot.setdefault(key_slot(op.key.encode()) if self._cluster else 0, []).append(op)
        for slot_ops in sorted(by_slot.values(), key=lambda group: any(op.acknowledges for op in group)):
            if self.settings.redis_wait_replicas > 0:
                # Replicated before the next read: a failover loses no acknowledgement or decision
                # some backend may already have seen.
                recorder = command_recorder()
                for op in slot_ops:
                    op.call(recorder)
                replicated(
                    self.redis,
                    slot_ops[0].key,
                    recorded(recorder),
                    self.settings.redis_wait_replicas,
                    self.settings.redis_wait_timeout_ms,
                    transaction=True,
                )
                continue
            pipe = self.redis.pipeline(transaction=True)
            for op in slot_ops:
                op.call(pipe)
            pipe.execute()

    # ---- back-pressure: Redis refusing for now -----------------------------------------------
    def _until_accepted(self, attempt: Callable[[], T], what: str, holding: Sequence[Entry] = ()) -> T:
        """Call attempt until Redis stops refusing (OOM, READONLY, LOADING, MASTERDOWN, down),
        waiting with a bounded backoff; re-raises only if the worker is asked to stop.
        `holding`: the pending entries in hand, kept ours meanwhile (see _keep_holding)."""
        last_refresh = time.monotonic()
        while True:
            try:
                result = attempt()
            except (*REDIS_ERRORS, StageBacklog) as exc:
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

    def _keep_holding(self, entries: Sequence[Entry]) -> None:
        """Reset the idle time of the entries in hand (XCLAIM to ourselves, allowed on a full
        server), so that an idle replica does not reclaim a batch this worker is waiting to
        commit and process it a second time."""
        try:
            for stream, batch in _by_stream(entries).items():
                self.redis.xclaim(stream, self.group, self.consumer, 0, [e.id for e in batch], justid=True)
        except REDIS_ERRORS as exc:
            log.debug("could not refresh entries in hand", extra={"stage": self.group, "error": str(exc)[:300]})

    def _wait_out(self, kind: str, exc: Exception, what: str, at_most_s: float | None = None) -> None:
        metrics.BACKPRESSURE.labels(self.group, kind).inc()
        self.heartbeat.waiting(f"{what}: {'a stage dependency' if kind == 'backlog' else 'redis'} {kind}")
        now = time.monotonic()
        if now - self._last_backpressure_log >= BACKPRESSURE_LOG_EVERY_S:
            self._last_backpressure_log = now
            log.warning(
                "redis refuses for now; holding and retrying",
                extra={
                    "stage": self.group,
                    "kind": kind,
                    "during": what,
                    "error": str(exc)[:300],
                    "retry_in_s": self._backoff.next_s,
                },
            )
        if (kind in ("readonly", "unavailable") and self._cluster) or kind == "readonly":
            # After a failover the address may lead to the new primary (a cluster: another node
            # serves the slot): reconnect, do not reuse.
            self._reset_connections()
        if kind == "oom" and now - self._last_trim >= 5.0:
            self._trim_freeing_memory()
        self._backoff.wait(at_most_s)

    def _reset_connections(self) -> None:
        try:
            reset_connections(self.redis)
        except REDIS_ERRORS as exc:  # the cluster is still electing: the next attempt retries
            log.debug("could not refresh the cluster's slots", extra={"stage": self.group, "error": str(exc)[:300]})

    def _resumed(self, what: str) -> None:
        self.heartbeat.redis_answered()
        waited = self._backoff.reset()
        if waited is not None:
            self._last_backpressure_log = 0.0
            log.info(
                "redis accepts again; resuming",
                extra={"stage": self.group, "during": what, "waited_s": round(waited, 1)},
            )

    def _trim_freeing_memory(self) -> None:
        """While Redis is full, trimming what every group has processed may free room."""
        self._last_trim = time.monotonic()
        try:
            self._trim_history()
        except REDIS_ERRORS as exc:
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
            if self._deferred or self._deferred_series:
                self._publish_deferred()
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
        its own attempt and a poison entry fails alone. Give up on hopeless ones. Every
        partition in turn: a replica that died leaves entries in each partition it read."""
        for stream in self.streams:
            self._reclaim_stream(stream)

    def _reclaim_stream(self, stream: str) -> None:
        start = "0-0"
        while not self._stopping:
            next_start, claimed, deleted = self.redis.xautoclaim(
                stream, self.group, self.consumer, self.settings.claim_idle_ms, start, count=self.settings.batch_size
            )
            if deleted:  # gone from the stream (erased): forget their failures
                errors = self._errors_key(Entry(b"", {}, stream))
                self.redis.hdel(errors, *[f for i in deleted for f in self._failure_fields(i)])
            if claimed:
                metrics.RECLAIMED.labels(self.group).inc(len(claimed))
                log.info(
                    "reclaimed pending entries", extra={"stage": self.group, "count": len(claimed), "stream": stream}
                )
                for entry in self._drop_hopeless(stream, claimed):
                    self._handle_alone(entry)
            if next_start in (b"0-0", "0-0"):
                return
            start = next_start

    def _drop_hopeless(self, stream: str, claimed: list) -> list[Entry]:
        """Count a failure for each entry whose consumer died (or stalled past claim_idle_ms)
        while processing it alone; dead-letter those that reached max_deliveries failures.
        Entries that were merely in a batch with it are not counted against."""
        keep = []
        for entry_id, fields in claimed:
            entry = Entry(entry_id, fields or {}, stream)
            holder = self.redis.hget(self._errors_key(entry), self._failure_fields(entry_id)[2])
            if holder is not None:
                error = (
                    f"consumer {holder.decode(errors='replace')} died or stalled past claim_idle_ms "
                    "while processing it alone"
                )
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
        errors = self._errors_key(entry)
        self._until_accepted(lambda: self.redis.hset(errors, alone, self.consumer), "mark", holding=[entry])
        self._handle_one(entry, message)

    def _update_gauges(self) -> None:
        """Lag and pending per partition stream (the `stream` label names the partition)."""
        for stream in self.streams:
            for group in self.redis.xinfo_groups(stream):
                if group["name"] in (self.group, self.group.encode()):
                    metrics.GROUP_LAG.labels(self.group, stream).set(group.get("lag") or 0)
                    metrics.GROUP_PENDING.labels(self.group, stream).set(group.get("pending") or 0)

    def _trim_history(self) -> None:
        """Keep image_retention_s of history in the streams that carry face images or chips
        (biometric data: exactly, not by whole stream nodes), stream_retention_s in the others
        (decisions, replies), and at most stream_maxlen entries, in every stream this worker
        reads or writes, never trimming an entry some consumer group has not read and
        acknowledged. Unread entries past the bound are back-pressure (the gateway refuses new
        frames), not something to drop."""
        self._ensure_group_once()  # our own input counts as unread until our group exists
        now_ms = int(time.time() * 1000)
        for stream in sorted({*self.streams, self.settings.key("dead"), *self._written}):
            oldest_ms = max(now_ms - self._retention_s(stream) * 1000, 0)
            awaits_group = "1" if stream in self._awaits_group else "0"
            trimmed, length = self.redis.eval(
                _TRIM_SAFELY, 1, stream, oldest_ms, self.settings.stream_maxlen, awaits_group
            )
            metrics.STREAM_LENGTH.labels(stream).set(length)
            if length > self.settings.stream_maxlen:
                log.warning(
                    "stream past its length bound with entries not yet processed; kept (back-pressure)",
                    extra={
                        "stage": self.group,
                        "stream": stream,
                        "length": length,
                        "bound": self.settings.stream_maxlen,
                        "trimmed": trimmed,
                    },
                )

    def _retention_s(self, stream: str) -> int:
        carries_faces = self.partitions.base_name(stream) in IMAGE_STREAMS
        return self.settings.image_retention_s if carries_faces else self.settings.stream_retention_s


@dataclass(frozen=True)
class _Op:
    """One command of a commit: `key` places it (its hash slot on a cluster)."""

    key: str
    call: Callable[..., object]  # called with the pipeline; defaults bind the loop's values
    acknowledges: bool = False


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's reply as entries that know their stream."""
    return [Entry(eid, fields, _text(stream)) for stream, items in (reply or []) for eid, fields in items]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _by_stream(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    grouped: dict[str, list[Entry]] = {}
    for entry in entries:
        grouped.setdefault(entry.stream, []).append(entry)
    return grouped


def _decoded(entry: Entry) -> Message | None:
    try:
        return decode(entry.fields.get(FIELD, b""))
    except MalformedMessage:
        return None


def _described(entry: Entry) -> dict[bytes, bytes]:
    """What a dead letter keeps of its entry: which frame it was (type, FrameRef), its size and
    digest — never its bytes, which are face images and chips (biometric data, item 11)."""
    body = entry.fields.get(FIELD, b"")
    described = {
        b"bytes": str(sum(len(v) for v in entry.fields.values())).encode(),
        b"sha256": hashlib.sha256(body).hexdigest().encode(),
        b"fields": b",".join(sorted(entry.fields)),
    }
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
