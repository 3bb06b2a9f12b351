"""Archiver: writes each decided payment session to the audit archive, once.

How a session's entries are gathered (the streams are the staging area; nothing is copied):

- The archiver has its own consumer group `archiver` on the per-frame streams (`frames`,
  `faces`, `aligned`, `posed`, and `embeddings` when the recognizer keeps them for the archive:
  the "taps") and on `decision-records` (its input, read by the runtime): the recognizer writes
  each session's record there in the same once-only write as its decision event on `decisions`,
  which the archiver does not read (backends do; the record's per-frame users and scores are
  kept from them).
- A tap entry it reads stays *pending* in its group: trimming never passes a group's pending
  entries, so the frame stays in Redis until its session is archived, however long the archive
  is down. Redis keeps only an index per open session: a set of "tap|entry id" strings (≈25 bytes
  per entry), plus an "archived" marker per session for late frames.
- A decision record (the recognizer's `DecisionMsg`: the signed event, each frame's scores, the
  rule in force) triggers the gathering: read the indexed entries back (XRANGE by id), verify each one
  (the writer's Ed25519 signature for that stream, the gateway's attestation of the frame's
  origin, the image's digest, the session), build the `ArchivedSession`, archive it (idempotent),
  then acknowledge every entry of the session in one script. The runtime acknowledges the
  decision afterwards; a crash in between archives nothing twice (archive() is idempotent).
- Archive down → `StageBacklog`: the runtime holds the decision pending and retries; the tap
  entries stay pending; lag grows; nothing is lost.
- A tenant with no key in the archive keys file (a configuration error for that tenant alone) →
  its decision is deferred (`EntryDeferred`): left pending, uncounted, tried again once idle
  (claim_idle_ms), while other tenants' decisions are archived; its tap entries stay pending
  (kept from trimming). Loud: an error naming the tenant, facepay_archive_held_sessions_total,
  the decision-records group's pending count. The keys file is reread when it changes, so adding the
  key (a Secret updated in place) is enough: the session is archived at its next try.
- A store's chain refusing appends (tampered, unreadable) → the session is quarantined: sealed
  in its place outside the chain, with a signed note, chained once the chain is restored. Not
  held: one store's broken chain must not stall every store, nor keep frames in Redis for days.

Why not let the recognizer carry everything: its messages hold chips, not the frame as received,
and the per-stage outputs (boxes, landmarks, pose) are gone by then; copying them into Redis
staging would double Redis memory for every open session. Why not stage in S3: ~4 PUTs per frame.

Partitioned streams (`stream_partitions > 1`, a Redis/Valkey Cluster): the archiver reads every
partition of each tap, and a session's index keys (staged set, archived marker) and its
partition's open-sessions set carry the session's partition hash tag, like its stream entries:
the index and release scripts touch one hash slot. The retention and drain turns are global
single-key SET NX.

Any number of replicas: the index lives in Redis, and any consumer may acknowledge any pending
entry of the group, so the replica that reads the decision need not be the one that read the
frames. Entries a dead replica read but never indexed are reclaimed (XAUTOCLAIM) and indexed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import redis

from facepay.archive import (
    ArchiveAccessDenied,
    ArchivedFrame,
    ArchivedSession,
    ArchiveError,
    ArchiveKeyError,
    ArchiveSettings,
    ArchiveStore,
    ArchiveTampered,
    ArchiveUnavailable,
    Candidate,
    SignedDecision,
)
from facepay.config import Settings
from facepay.keys import TrustedKeys, load_trusted
from facepay.messages import (
    FIELD,
    AlignedMsg,
    DecisionMsg,
    EmbeddingMsg,
    FaceMsg,
    FrameMsg,
    MalformedMessage,
    Message,
    PosedMsg,
    Rejection,
    SessionEndMsg,
    decode,
)
from facepay.runtime import metrics
from facepay.runtime.envelope import Unauthenticated, image_digest, open_entry, origin_problem
from facepay.runtime.partitions import Partitions, per_partition
from facepay.runtime.redis_conn import connect
from facepay.runtime.stage import Emit, EntryDeferred, Stage, StageBacklog
from facepay.vocabulary import Purpose

log = logging.getLogger(__name__)

GROUP = "archiver"
# tap stream → the component that writes it, and the message types it may carry
TAPS: dict[str, tuple[str, frozenset[str]]] = {
    "frames": ("gateway", frozenset({"frame", "end"})),
    "faces": ("detector", frozenset({"face", "rejection", "end"})),
    "aligned": ("aligner", frozenset({"aligned", "rejection", "end"})),
    "posed": ("pose", frozenset({"posed", "rejection", "end"})),
    # only with archive_keep_embeddings (else empty): the recognizer's per-face embedding
    "embeddings": ("recognizer", frozenset({"embedding"})),
}
# The taps every frame the recognizer saw has an entry in (embeddings: only when kept, faces only).
WHOLE_FRAME = frozenset({"frames", "faces", "aligned", "posed"})
READ_COUNT = 200
HELD_LOG_EVERY_S = 60.0

# Index one tap entry under its session, unless the session is archived already (a late frame:
# acknowledge it). KEYS (one slot: the session's partition): staged set, archived marker, open
# sessions of the partition (zset), tap stream.
# ARGV: group, entry id, member, session key, now (ms).
_INDEX = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XACK', KEYS[4], ARGV[1], ARGV[2])
  return 0
end
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[4])
return 1
"""

# The session is archived (or abandoned): mark it, acknowledge every indexed entry, drop the
# index. KEYS (the session's partition): staged set, archived marker, open sessions, frames,
# faces, aligned, posed, embeddings.
# ARGV: group, marker ttl (s), session key, marker ("archived" | "released").
_RELEASE = """
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[2])
local taps = {frames = KEYS[4], faces = KEYS[5], aligned = KEYS[6], posed = KEYS[7], embeddings = KEYS[8]}
local released = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local tap, id = string.match(member, '^(%a+)|(.+)$')
  if taps[tap] then released = released + redis.call('XACK', taps[tap], ARGV[1], id) end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[3])
return released
"""


@dataclass
class Gathered:
    """A session's verified entries: sequence → tap → message, and the camera's frame count."""

    frames: dict[int, dict[str, Message]] = field(default_factory=lambda: defaultdict(dict))
    frame_count: int | None = None


def session_key(store_id: str, session_id: str) -> str:
    return f"{store_id}/{session_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _point(p: list[float]) -> tuple[float, float]:
    x, y = p
    return (x, y)


def _box(box: tuple[float, ...]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (x0, y0, x1, y1)


def image_format(image: bytes) -> str:
    if image.startswith(b"\xff\xd8"):
        return "jpeg"
    if image.startswith(b"\x89PNG"):
        return "png"
    return "unknown" if image else "missing"


class ArchiverStage(Stage):
    name = GROUP
    input = "decision-records"
    accepts_from = {"decision": frozenset({"recognizer"})}

    def __init__(self, settings: Settings, store: ArchiveStore | None = None) -> None:
        self.settings = settings
        self._given_store = store  # else start() opens FACEPAY_ARCHIVE_URL's
        self._bucket_ready = False
        self._held_since: dict[str, float] = {}  # decision → when it was first held for missing frames
        self.partitions = Partitions.of(settings)
        # every partition of every tap: stream name → its tap
        self._taps = {stream: tap for tap in TAPS for stream in self.partitions.streams(tap)}
        self._claim_cursor = dict.fromkeys(self._taps, "0-0")
        self._sweeper: threading.Thread | None = None
        self._held_logged: dict[str, tuple[float, int]] = {}  # tenant without a key → (last logged, tries since)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._given_store is not None:
            self.store = self._given_store
        elif not self.settings.archive_url:
            raise ValueError(
                "FACEPAY_ARCHIVE_URL is not set: the archiver needs an archive (s3://bucket or http://host:port/bucket)"
            )
        else:
            self.store = ArchiveStore.from_settings(ArchiveSettings.from_facepay(self.settings))
        self.redis = connect(self.settings.redis_url)
        self.trusted = load_trusted(self.settings.trusted_keys_file)
        # The replica's stable name (the pod's, FACEPAY_CONSUMER): a restarted replica is the same
        # consumer of the taps, not one more dead one in the groups.
        self.consumer = os.environ.get("FACEPAY_CONSUMER") or f"{socket.gethostname()}-{os.getpid()}"
        for stream in self._taps:
            self._ensure_group(stream)

    def refuse(self, message: Message, trusted: TrustedKeys) -> str:
        """The recognizer signed the entry (checked by the runtime); the session's ref must still
        be the gateway's. No age bound: an archiver behind an outage reads old decisions."""
        return origin_problem(message.ref, trusted)

    # ---- the runtime's calls ---------------------------------------------------------------
    def process(self, batch: list[Message]) -> list[Emit]:
        self._index_taps()
        for decision in batch:
            assert isinstance(decision, DecisionMsg)
            self._archive_decided(decision)
        return []

    def tick(self) -> list[Emit]:
        self._index_taps()
        self._reclaim_taps()
        self._release_orphans()
        self._sweep_when_due()
        self._drain_quarantine_when_due()
        return []

    # ---- retention -------------------------------------------------------------------------
    def _sweep_when_due(self) -> None:
        """The retention sweep, every archive_sweep_every_s, by whichever replica takes the
        turn first (SET NX with that TTL); beside the loop, so a long sweep adds no lag."""
        if self._sweeper is not None and self._sweeper.is_alive():
            return
        turn = self.settings.key(GROUP, "sweep-turn")
        if not self.redis.set(turn, self.consumer, nx=True, ex=self.settings.archive_sweep_every_s):
            return
        self._sweeper = threading.Thread(target=self._sweep, name="archive-sweep", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        try:
            self._ensure_bucket()  # the first turn may come before the first session made the bucket
            report = self.store.sweep(self.settings.archive_retention_days)
        except Exception:  # the next turn retries; the archive stays as it was
            log.exception("archive retention sweep failed")
            return
        log.info(
            "archive retention sweep",
            extra={
                "deleted_sessions": report.deleted_sessions,
                "deleted_entries": report.deleted_entries,
                "cutoff_ms": report.cutoff_ms,
            },
        )

    # ---- keys ------------------------------------------------------------------------------
    def _stream(self, tap: str, key: str) -> str:
        """Tap `tap`'s stream in session `key`'s partition."""
        return self.partitions.stream(tap, key)

    def _keys(self, key: str) -> list[str]:
        """The session's index keys, in its partition's slot: staged set, archived marker, and
        the partition's open sessions."""
        p = self.partitions
        return [
            p.session_key(key, GROUP, "staged", key),
            p.session_key(key, GROUP, "archived", key),
            p.session_key(key, GROUP, "open"),
        ]

    def _ensure_group(self, stream: str) -> None:
        try:
            self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- indexing the taps -----------------------------------------------------------------
    def _index_taps(self) -> None:
        """Read every tap entry not yet delivered to the group and index it under its session:
        a round over every partition of every tap (one read per stream, pipelined: on a cluster
        a read cannot span slots), until a round brings nothing."""
        streams = list(self._taps)
        count = per_partition(READ_COUNT, self.partitions.count)
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count)
            entries = [
                (_text(stream), eid, fields)
                for reply in pipe.execute()
                for stream, items in (reply or [])
                for eid, fields in items
            ]
            if not entries:
                return
            self._index(entries)

    def _index(self, entries: list[tuple[str, bytes, dict]]) -> None:
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id, fields in entries:
            tap = self._taps[stream]
            ref = self._ref_of(fields)
            if ref is None or ref.purpose == Purpose.ENROLL:  # not a payment session's: nothing to keep
                pipe.xack(stream, GROUP, entry_id)
                continue
            key = session_key(ref.store_id, ref.session_id)
            if self._stream(tap, key) != stream:  # no stage writes there: not gathered, not kept
                log.error(
                    "tap entry outside its session's partition: left out of the archive",
                    extra={"session_id": key, "stream": stream, "entry": entry_id.decode()},
                )
                metrics.ARCHIVE_LEFT_OUT.labels(tap).inc()
                pipe.xack(stream, GROUP, entry_id)
                continue
            member = f"{tap}|{entry_id.decode()}"
            # Plain EVAL (no SCRIPT LOAD, which the components' Redis ACL users may not run), as a
            # raw command: a cluster pipeline has no eval() but routes EVAL by its keys' slot.
            pipe.execute_command("EVAL", _INDEX, 4, *self._keys(key), stream, GROUP, entry_id, member, key, now_ms)
        pipe.execute()

    @staticmethod
    def _ref_of(fields: dict[bytes, bytes]):
        """The entry's session, unverified: only to file it (it is verified when archived)."""
        try:
            return decode(fields.get(FIELD, b"")).ref
        except MalformedMessage:
            return None

    def _reclaim_taps(self, full_pass: bool = False) -> None:
        """Entries a dead replica read but may not have indexed: take them over and index them
        (indexing twice is harmless). A bounded number per tick, resuming where the last stopped;
        or every idle entry (a decision is missing frames)."""
        streams = list(self._taps)
        while streams:  # one pipelined round over every partition of every tap (a round trip per node)
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xautoclaim(
                    stream,
                    GROUP,
                    self.consumer,
                    self.settings.claim_idle_ms,
                    self._claim_cursor[stream],
                    count=READ_COUNT,
                )
            unfinished = []
            for stream, (cursor, claimed, *_) in zip(streams, pipe.execute(), strict=True):
                self._claim_cursor[stream] = _text(cursor)
                if claimed:
                    self._index([(stream, eid, fields) for eid, fields in claimed if fields])
                if full_pass and self._claim_cursor[stream] != "0-0":
                    unfinished.append(stream)
            streams = unfinished

    def _release_orphans(self) -> None:
        """Sessions no decision came for (every frame refused by the recognizer, an enrollment
        cut short): release their entries after archive_orphan_after_s — but only while no
        decision older than that is still waiting here, so an outage never releases a session."""
        cutoff_ms = int(time.time() * 1000) - self.settings.archive_orphan_after_s * 1000
        if self._oldest_waiting_decision_ms() < cutoff_ms:
            return
        for open_sessions in self.partitions.all(GROUP, "open"):
            for found in self.redis.zrangebyscore(open_sessions, "-inf", cutoff_ms, start=0, num=100):
                key = _text(found)
                released = self._release(key, "released")
                metrics.ARCHIVED.labels("released_undecided").inc()
                log.warning(
                    "session never decided: its entries are released unarchived",
                    extra={"session_id": key, "entries": released},
                )

    def _oldest_waiting_decision_ms(self) -> int:
        """Redis time (ms) of the oldest decision not yet archived, in any partition; 'infinity'
        if none waits."""
        oldest = 2**63
        for stream in self.partitions.streams(self.input):
            for group in self.redis.xinfo_groups(stream):
                if group["name"] in (GROUP, GROUP.encode()):
                    if group.get("pending"):
                        oldest = min(oldest, int(self.redis.xpending(stream, GROUP)["min"].split(b"-")[0]))
                    elif group.get("lag"):
                        return 0
        return oldest

    def _release(self, key: str, marker: str) -> int:
        ttl = max(self.settings.archive_orphan_after_s, self.settings.max_frame_age_s, 3600)
        streams = [self._stream(t, key) for t in TAPS]
        return int(self.redis.eval(_RELEASE, 3 + len(streams), *self._keys(key), *streams, GROUP, ttl, key, marker))

    # ---- archiving one decided session -----------------------------------------------------
    def _archive_decided(self, decision: DecisionMsg) -> None:
        ref = decision.ref
        key = session_key(ref.store_id, ref.session_id)
        event = self._event(decision)
        if self.redis.get(self._keys(key)[1]) == b"archived":  # a redelivered decision
            return
        self._defer_without_tenant_key(key, self._tenant(decision, event))
        gathered = self._gather(key)
        missing = self._missing(event, gathered)
        if missing:  # perhaps read by a replica that died before filing them: take them over
            self._reclaim_taps(full_pass=True)
            gathered = self._gather(key)
            missing = self._missing(event, gathered)
        if missing and not self._grace_over(key):
            raise StageBacklog(f"session {key}: waiting for {len(missing)} frame(s) to reach the archiver")
        self._held_since.pop(key, None)
        session = self._session(decision, event, gathered)
        self._archive(session, key)
        released = self._release(key, "archived")
        metrics.ARCHIVED.labels("missing_frames" if missing else "complete").inc()
        log.info(
            "session archived",
            extra={"session_id": key, "frames": len(session.frames), "entries": released, "missing_frames": missing},
        )

    @staticmethod
    def _tenant(decision: DecisionMsg, event: dict) -> str:
        return event.get("tenant_id") or decision.ref.tenant_id or "default"

    def _defer_without_tenant_key(self, key: str, tenant: str, why: str = "") -> None:
        """A tenant missing from the archive keys holds its own sessions, never the others'."""
        if not why and self.store.has_key_for(tenant):
            return
        metrics.ARCHIVE_HELD.labels(tenant).inc()
        last, tries = self._held_logged.get(tenant, (0.0, 0))
        if time.monotonic() - last < HELD_LOG_EVERY_S:  # every held session retries: one error per tenant a minute
            self._held_logged[tenant] = (last, tries + 1)
        else:
            self._held_logged[tenant] = (time.monotonic(), 0)
            log.error(
                "no archive key for the tenant: its sessions are held (pending, frames kept) until its key is added "
                "to FACEPAY_ARCHIVE_KEYS_FILE; other tenants are archived meanwhile",
                extra={
                    "session_id": key,
                    "tenant": tenant,
                    "held_tries_since_last_report": tries,
                    "error": why or f"tenant {tenant!r} not in the keys file",
                },
            )
        raise EntryDeferred(f"no archive key for tenant {tenant!r}; session {key} held", "no_archive_key", tenant)

    @staticmethod
    def _event(decision: DecisionMsg) -> dict:
        try:
            event = json.loads(decision.payload)
        except ValueError as exc:
            raise Unauthenticated(f"decision payload is not JSON: {exc}") from exc
        if event.get("session_id") != decision.ref.session_id or event.get("store_id") != decision.ref.store_id:
            raise Unauthenticated("decision event names another session than its message")
        return event

    def _grace_over(self, key: str) -> bool:
        """Frames a dead replica holds become claimable after claim_idle_ms: the grace starts then."""
        first = self._held_since.setdefault(key, time.monotonic())
        grace_s = self.settings.claim_idle_ms / 1000 + self.settings.archive_gather_grace_s
        return time.monotonic() - first >= grace_s

    @staticmethod
    def _missing(event: dict, gathered: Gathered) -> list[int]:
        """Frames the recognizer saw not yet gathered whole: each went through every stage (a
        rejection is passed on), so each has an entry in frames, faces, aligned and posed. Its
        posed entry alone is not enough: a dead replica's taps become claimable one by one
        (read at different times; a take-over pass may cross claim_idle_ms between two taps)."""
        seen = int(event.get("frames_seen") or 0)
        have = sum(1 for stages in gathered.frames.values() if stages.keys() >= WHOLE_FRAME)
        return [] if have >= seen else [seen - have]

    def _gather(self, key: str) -> Gathered:
        """sequence → tap → the verified message (and the frame count the camera announced);
        entries that do not verify are left out (and logged): the pipeline's stages dead-letter
        them too."""
        store_id, _, session_id = key.partition("/")
        members = sorted(m.decode() for m in self.redis.smembers(self._keys(key)[0]))
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            tap, _, entry_id = member.partition("|")
            pipe.xrange(self._stream(tap, key), entry_id, entry_id)
        gathered = Gathered()
        for member, found in zip(members, pipe.execute(), strict=True):
            tap = member.partition("|")[0]
            if not found:
                log.error("indexed entry missing from its stream", extra={"session_id": key, "entry": member})
                continue
            try:
                message = self._verified(tap, self._stream(tap, key), found[0][1])
            except (Unauthenticated, MalformedMessage) as refused:
                metrics.ARCHIVE_LEFT_OUT.labels(tap).inc()
                log.error(
                    "entry left out of the archive: it does not verify",
                    extra={"session_id": key, "entry": member, "error": str(refused)},
                )
                continue
            if (message.ref.store_id, message.ref.session_id) != (store_id, session_id):
                continue
            if isinstance(message, SessionEndMsg):
                if tap == "frames":  # the gateway's: what the camera announced
                    gathered.frame_count = message.frame_count
                continue
            gathered.frames[message.ref.sequence].setdefault(tap, message)  # at-least-once: keep the first
        return gathered

    def _verified(self, tap: str, stream: str, fields: dict[bytes, bytes]) -> Message:
        signer, types = TAPS[tap]
        _, body = open_entry(fields, stream, self.trusted, {signer})
        message = decode(body)
        if message.TYPE not in types:
            raise Unauthenticated(f"{signer!r} may not write {message.TYPE!r} messages to {tap}")
        problem = origin_problem(message.ref, self.trusted)
        if problem:
            raise Unauthenticated(problem)
        if isinstance(message, FrameMsg) and image_digest(message.image) != message.ref.image_sha256:
            raise Unauthenticated("frame image does not match the digest the gateway attested")
        return message

    def _session(self, decision: DecisionMsg, event: dict, gathered: Gathered) -> ArchivedSession:
        ref = decision.ref
        scores = {int(f.get("sequence", -1)): f for f in decision.frames}
        frames = [
            self._frame(seq, gathered.frames.get(seq, {}), scores.get(seq, {}))
            for seq in sorted(set(gathered.frames) | set(scores))
        ]
        first_ms = min((f.received_ms for f in frames if f.received_ms), default=int(event.get("first_frame_ms") or 0))
        return ArchivedSession(
            session_id=ref.session_id,
            tenant=self._tenant(decision, event),
            store=ref.store_id,
            camera=ref.camera_id,
            first_frame_ms=first_ms,
            decided_ms=int(event.get("decided_at_ms") or 0),
            decision=SignedDecision(decision.payload, decision.signature, decision.key_id),
            models=dict(event.get("model_ids") or {}),
            threshold=float(event.get("threshold") or 0.0),
            policy=dict(decision.policy),
            frames=frames,
            frame_count=gathered.frame_count,
        )

    @staticmethod
    def _frame(sequence: int, stages: dict[str, Message], scores: dict) -> ArchivedFrame:
        frame, face, aligned, posed = (stages.get(t) for t in ("frames", "faces", "aligned", "posed"))
        embedding = stages.get("embeddings")
        image = frame.image if isinstance(frame, FrameMsg) else b""
        ref = next((m.ref for m in stages.values()), None)  # the gateway's attested ref, on every stage's entry
        rejection = next((f"{m.stage}:{m.reason}" for m in (face, aligned, posed) if isinstance(m, Rejection)), None)
        if not stages:
            rejection = "frame_missing"
        elif frame is None:
            rejection = rejection or "frame_missing"
        top_k = Candidate.top_two(scores)
        liveness = {}
        if isinstance(aligned, AlignedMsg):
            liveness = {
                k: float(v)
                for k, v in (("antispoof", aligned.antispoof), ("liveness", aligned.liveness))
                if v is not None
            }
        return ArchivedFrame(
            index=sequence,
            received_ms=ref.received_ms if ref else 0,
            image=image,
            image_format=image_format(image),
            captured_ms=ref.captured_ms if ref else 0,
            phone_suffix=ref.phone_suffix if ref else "",
            face_box=_box(face.frame_box) if isinstance(face, FaceMsg) else None,
            face_points=[_point(p) for p in face.points5] if isinstance(face, FaceMsg) else None,
            detector_score=float(face.score) if isinstance(face, FaceMsg) else None,
            faces_in_frame=int(face.faces_in_frame) if isinstance(face, FaceMsg) else None,
            landmarks=[_point(p) for p in aligned.landmarks] if isinstance(aligned, AlignedMsg) else None,
            eye_aspect_ratio=float(sum(aligned.ear) / 2) if isinstance(aligned, AlignedMsg) else None,
            liveness=liveness,
            pitch=posed.pitch if isinstance(posed, PosedMsg) else None,
            yaw=posed.yaw if isinstance(posed, PosedMsg) else None,
            roll=posed.roll if isinstance(posed, PosedMsg) else None,
            eligible=posed.eligible if isinstance(posed, PosedMsg) else None,
            top_k=top_k,
            second_score=float(scores["second_score"]) if "second_score" in scores else None,
            embedding=[float(x) for x in embedding.vector] if isinstance(embedding, EmbeddingMsg) else None,
            rejection=rejection or (scores.get("reason") or None),
        )

    def _archive(self, session: ArchivedSession, key: str) -> None:
        """Archive, or hold the decision back (StageBacklog) while the archive cannot take it."""
        try:
            self._ensure_bucket()
            self.store.archive(session)
        except ArchiveTampered as exc:
            self._quarantine(session, key, exc)
        except ArchiveUnavailable as exc:
            raise StageBacklog(f"archive unavailable; session {key} held: {exc}") from exc
        except ArchiveKeyError as exc:  # its tenant's key, in the keys file: that tenant's alone
            self._defer_without_tenant_key(key, session.tenant, str(exc))
        except ArchiveAccessDenied as exc:
            # Waiting will not fix these, but releasing would lose the session: hold, loudly.
            log.error(
                "archive refuses the session; held until an operator acts", extra={"session_id": key, "error": str(exc)}
            )
            raise StageBacklog(f"archive refuses session {key}: {exc}") from exc
        except ArchiveError as exc:  # contention: retry
            raise StageBacklog(f"archive busy; session {key} held: {exc}") from exc

    def _ensure_bucket(self) -> None:
        if not self._bucket_ready:
            self.store.ensure_bucket()
            self._bucket_ready = True

    def _quarantine(self, session: ArchivedSession, key: str, refused: ArchiveTampered) -> None:
        """The store's chain refuses appends (a forged or missing head, an unreadable entry):
        holding the decision would stall every store behind it and keep the frames in Redis
        until someone looks. The session is kept sealed outside the chain instead, and chained
        when the chain is whole again (`_drain_quarantine_when_due`)."""
        try:
            self.store.quarantine(session, str(refused))
        except ArchiveUnavailable as exc:
            raise StageBacklog(f"archive unavailable; session {key} held: {exc}") from exc
        except ArchiveError as exc:
            raise StageBacklog(f"archive refuses session {key} and its quarantine: {exc}") from exc
        metrics.ARCHIVE_QUARANTINED.labels(session.tenant, session.store).inc()
        log.error(
            "store's archive chain refuses appends (tampered or unreadable): session kept outside the chain "
            "(quarantined) until the chain is restored; run `facepay audit verify`",
            extra={"session_id": key, "tenant": session.tenant, "store": session.store, "error": str(refused)},
        )

    def _drain_quarantine_when_due(self) -> None:
        """Chain quarantined sessions whose store's chain takes appends again; one replica per
        turn (SET NX with the retry period), so two never chain the same session."""
        turn = self.settings.key(GROUP, "drain-turn")
        if not self.redis.set(turn, self.consumer, nx=True, ex=self.settings.archive_quarantine_retry_s):
            return
        try:
            self._ensure_bucket()  # a restarted archiver drains before its first new session
            chained = self.store.drain_quarantine()
        except ArchiveError as exc:  # the next turn retries
            log.warning("quarantined sessions not drained this turn", extra={"error": str(exc)})
            return
        for session_id in chained:
            log.warning(
                "quarantined session chained: its store's chain takes appends again", extra={"session_id": session_id}
            )
        metrics.ARCHIVED.labels("chained_from_quarantine").inc(len(chained))
