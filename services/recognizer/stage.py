"""Recognizer: embed each eligible face, search the gallery 1:N, vote over the frames of a
payment session, and emit one signed payment-authorization event per session.

Enrollment sessions travel the same stages; here their accepted faces become the user's
template (the L2-normalised mean embedding, with each embedding kept as a sample).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import msgpack
import numpy as np

from facepay import thresholds
from facepay.config import Settings
from facepay.images import decode_trusted
from facepay.keys import TrustedKeys, load_trusted
from facepay.gallery import Gallery, open_gallery
from facepay.messages import FIELD, AdminMsg, DecisionMsg, FrameRef, Message, PosedMsg, Rejection, SessionEndMsg
from facepay.models.registry import recognizer_defaults
from facepay.runtime import metrics
from facepay.runtime.envelope import origin_problem
from facepay.runtime.redis_conn import TRANSIENT, connect
from facepay.runtime.stage import Emit, Stage
from facepay.signing import sign
from services.recognizer.admin import admin_problem, handle_admin
from services.recognizer.embedder import load_embedder, template_space
from services.recognizer.enrollment import FaceSources, mean_template, store_templates
from services.recognizer.limits import FailureLimiter
from services.recognizer.policy import FrameResult, Verdict, decide
from services.recognizer.state import SessionState, SessionStore, UnreadableState, decided_key, session_key

log = logging.getLogger(__name__)

OPTIMIZE_EVERY_S = 600


class RecognizerStage(Stage):
    name = "recognizer"
    input = "posed"
    # Frames come from the pose stage (and carry the gateway's attestation); commands from the operator.
    accepts_from = {**{t: frozenset({"pose"}) for t in ("posed", "rejection", "end")}, "admin": frozenset({"operator"})}

    def __init__(self, settings: Settings, gallery: Gallery | None = None) -> None:
        self.settings = settings
        self.gallery = gallery
        self.policy = settings.policy

    def start(self) -> None:
        if not self.settings.signing_key:
            raise ValueError("FACEPAY_SIGNING_KEY is not set: decisions must be signed")
        self.embedder = load_embedder(self.settings.recognizer_model, self.settings.device)
        # The vectors' space: the recognizer and the landmarks its chips were aligned with.
        self.space_id = template_space(self.embedder.model_id, self.settings.landmarks_model)
        self.gallery = self.gallery or open_gallery(self.settings.gallery_url, tuning=self.settings.qdrant)
        self.gallery.ensure_collection(self.space_id, self.embedder.dim)
        client = connect(self.settings.redis_url)
        self.sessions = SessionStore(client, self.settings)
        self.limits = FailureLimiter(client, self.settings)
        self.face_sources = FaceSources(client, self.settings)
        self.remember_space(self.space_id)
        defaults = recognizer_defaults(self.embedder.model_id, self.embedder.default_threshold)
        self.non_commercial = defaults.non_commercial or getattr(self.embedder, "non_commercial", False)
        if self.non_commercial:
            # An operator never runs a non-commercial model without being told, at every start.
            log.warning("NON-COMMERCIAL MODEL: %s", getattr(self.embedder, "licence_notice", defaults.licence),
                        extra={"model_id": self.embedder.model_id})
        # Only thresholds the operator signed count (facepay/thresholds.py). Threshold, margin and
        # k belong to the template space: setting > session calibration > the model's default.
        self.calibrated = thresholds.CalibratedThreshold(client, self.settings, self.space_id,
                                                         self.embedder.default_threshold,
                                                         load_trusted(self.settings.trusted_keys_file),
                                                         defaults.margin, defaults.min_agreeing_frames)
        self._refresh_threshold()
        self._last_threshold_check = self._last_optimize = time.monotonic()
        self._optimizer: threading.Thread | None = None
        # Sessions decided in the last batch or tick → what to do with their state once the
        # runtime has written the decision ("forget" or "quarantine"); see `_settle_decided`.
        self._decided_last_turn: dict[str, str] = {}

    def remember_space(self, space: str) -> None:
        """Every template space that holds users, so that a deletion reaches all of them."""
        self.sessions.redis.sadd(self.settings.key("spaces"), space)

    def other_spaces(self) -> list[str]:
        return sorted(s.decode() for s in self.sessions.redis.smembers(self.settings.key("spaces"))
                      if s.decode() != self.space_id)

    def _refresh_threshold(self) -> None:
        rule = self.calibrated.current_rule()
        self.threshold, source = rule.threshold, rule.threshold_source
        if rule != getattr(self, "rule", None):
            log.info("threshold", extra={"space_id": self.space_id, "threshold": self.threshold, "source": source,
                                         "margin": rule.margin, "margin_source": rule.margin_source,
                                         "min_agreeing_frames": rule.min_agreeing_frames,
                                         "min_agreeing_frames_source": rule.min_agreeing_frames_source})
        self.rule = rule
        self.policy = self.settings.policy.for_space(rule.margin, rule.min_agreeing_frames)
        self.threshold_source = source

    def stop(self) -> None:
        if self.gallery:
            self.gallery.close()

    def refuse(self, message: Message, trusted: TrustedKeys) -> str:
        """The chain: pose signed the entry (checked by the runtime) and the gateway attested the
        frame's origin, recently. Admin commands: fresh and never seen before."""
        if isinstance(message, AdminMsg):
            return admin_problem(self, message)
        return origin_problem(message.ref, trusted, self.settings.max_frame_age_s)

    # ---- one batch -------------------------------------------------------------------------
    def process(self, batch: list[Message]) -> list[Emit]:
        self._settle_decided()
        admin = [m for m in batch if isinstance(m, AdminMsg)]
        batch = [m for m in batch if not isinstance(m, AdminMsg)]
        emits = [handle_admin(self, m) for m in admin]
        if not batch:
            return emits
        decided = self.sessions.is_decided(sorted({session_key(m.ref) for m in batch}))
        live = [m for m in batch if not decided[session_key(m.ref)]]
        embeddings = self._embed([m for m in live if self._to_embed(m)])
        for message in live:
            if isinstance(message, SessionEndMsg):
                self.sessions.record(message.ref, frame_count=message.frame_count)
            else:
                models = message.models if isinstance(message, PosedMsg) else None
                result = self._frame_result(message, embeddings.get(id(message)))
                self.sessions.record(message.ref, result=result, models=models)
        for key in dict.fromkeys(session_key(m.ref) for m in live):
            emits += self._evaluate(key, timed_out=False)
        return emits

    def tick(self) -> list[Emit]:
        """Decline sessions whose frames stopped coming; forget the ones already decided;
        pick up a new calibrated threshold; keep the embedded gallery's index built."""
        now = time.monotonic()
        if now - self._last_threshold_check > 60:
            self._last_threshold_check = now
            self._refresh_threshold()
        if now - self._last_optimize > OPTIMIZE_EVERY_S:
            self._last_optimize = now
            self._optimize_in_background()
        self._settle_decided()
        emits = []
        for key in self.sessions.overdue():
            # One session's failure must not stop the timeouts of all the others.
            try:
                emits += self._time_out(key)
            except TRANSIENT:
                raise
            except Exception:
                log.exception("session timeout failed; the other sessions go on", extra={"session_id": key})
        return emits

    def _time_out(self, key: str) -> list[Emit]:
        if self.sessions.is_decided([key])[key]:
            self.sessions.forget(key)
            return []
        return self._evaluate(key, timed_out=True)

    def _settle_decided(self) -> None:
        """The runtime writes what a batch or tick returned before it calls the stage again, so
        here the last turn's decisions are written, unless that write failed (then the state
        stays for the retry). A decided session's state is erased (frame embeddings are
        biometric data) or, when unreadable, moved aside."""
        if not self._decided_last_turn:
            return
        pending, self._decided_last_turn = self._decided_last_turn, {}
        for key, decided in self.sessions.is_decided(sorted(pending)).items():
            if not decided:
                continue
            if pending[key] == "quarantine":
                aside = self.sessions.quarantine(key)
                log.error("unreadable session state declined and quarantined", extra={"session_id": key, "key": aside})
            else:
                self.sessions.forget(key)

    def _optimize_in_background(self) -> None:
        """qdrant-edge builds its HNSW index only when asked; the build blocks writes for a
        while (≈1 min at 100k), so it runs beside the loop, never on a payment's path."""
        optimize = getattr(self.gallery, "optimize", None)
        if optimize is None or (self._optimizer and self._optimizer.is_alive()):
            return
        self._optimizer = threading.Thread(target=optimize, args=(self.space_id,), daemon=True)
        self._optimizer.start()

    def _to_embed(self, message: Message) -> bool:
        """Every face that may vote; and, in payment sessions, faces rejected for pose, so that
        the rule can tell whether their eyes are the matched face's."""
        if not isinstance(message, PosedMsg):
            return False
        pose_rejected_payer = message.ref.purpose != "enroll" and self.embedder.chip_template in message.chips
        return message.eligible or pose_rejected_payer

    def _embed(self, faces: list[PosedMsg]) -> dict[int, np.ndarray]:
        if not faces:
            return {}
        template = self.embedder.chip_template
        chips = [decode_trusted(m.chips[template]) for m in faces]
        vectors = self.embedder.embed(chips)
        return {id(m): v for m, v in zip(faces, vectors)}

    def _frame_result(self, message: Message, vector: np.ndarray | None) -> FrameResult:
        ref = message.ref
        if isinstance(message, Rejection):
            return FrameResult(ref.sequence, ref.received_ms, reason=message.reason)
        assert isinstance(message, PosedMsg)
        ear = float(np.mean(message.ear))
        embedding = [float(x) for x in vector] if vector is not None else None
        if not message.eligible or vector is None:
            # A payment frame rejected for pose keeps its embedding: its blink counts only if
            # the embedding puts it on the matched face's track.
            return FrameResult(ref.sequence, ref.received_ms, reason=message.reason or "not_frontal", ear=ear,
                               embedding=embedding)
        if ref.purpose == "enroll":
            reason = self._enrollment_gate(message)
            if reason:
                return FrameResult(ref.sequence, ref.received_ms, reason=reason, ear=ear)
            return FrameResult(ref.sequence, ref.received_ms, ear=ear, embedding=embedding,
                               antispoof=message.antispoof, chips=message.chips)
        hits = self.gallery.search(self.space_id, vector, limit=2, tenant=ref.tenant_id or None,
                                   phone_suffix=ref.phone_suffix or None)
        top = hits[0] if hits else None
        second = hits[1].score if len(hits) > 1 else -1.0
        return FrameResult(ref.sequence, ref.received_ms, ear=ear, top_user=top.user_id if top else "",
                           top_score=top.score if top else -1.0, second_score=second, antispoof=message.antispoof,
                           embedding=embedding)

    def _enrollment_gate(self, face: PosedMsg) -> str:
        """A template is only as good as its photos: large, sharp and (weakly) live enough."""
        s = self.settings
        if face.face_px < s.enroll_min_face_px:
            return "face_too_small"
        if face.sharpness < s.enroll_min_sharpness:
            return "blurry"
        if face.antispoof is not None and face.antispoof < s.enroll_min_antispoof:
            return "spoof_suspected"
        return ""

    # ---- sessions --------------------------------------------------------------------------
    def _evaluate(self, key: str, timed_out: bool) -> list[Emit]:
        try:
            state = self.sessions.load(key)
        except UnreadableState as unreadable:
            return self._decline_unreadable(key, unreadable)
        if state is None:
            self.sessions.close(key)
            return []
        if state.meta.purpose == "enroll":
            emits = self._finish_enrollment(state, timed_out)
        else:
            verdict = decide(state.results, self.policy, self.threshold, state.expected_frames, timed_out)
            if verdict is None:
                return []
            verdict = self._apply_failure_limits(state, verdict)
            emits = [self._decision_emit(state, verdict)]
        if emits:
            self._decided_last_turn[key] = "forget"
        return emits

    def _decline_unreadable(self, key: str, unreadable: UnreadableState) -> list[Emit]:
        """A session whose state cannot be read can never be approved: decline it (the point of
        sale gets an answer), then move the state aside for an operator."""
        log.error("unreadable session state", extra={"session_id": key, "error": str(unreadable)})
        store_id, _, session_id = key.partition("/")
        meta = self.sessions.meta(key) or FrameRef(session_id, store_id, "", 0, 0)
        state = SessionState(meta, [], None, {})
        self._decided_last_turn[key] = "quarantine"
        if meta.purpose == "enroll":
            return [self._enrollment_emit(meta, {"user_id": meta.user_id, "tenant_id": meta.tenant_id,
                                                 "model_id": self.space_id, "images": [], "status": "rejected",
                                                 "duplicate_of": "", "duplicate_score": 0.0})]
        verdict = Verdict(False, ["unreadable_state"], "unreadable_state")
        return [self._decision_emit(state, verdict)]

    def _apply_failure_limits(self, state: SessionState, verdict: Verdict) -> Verdict:
        ref = state.meta
        locked = self.limits.locked(ref.camera_id, verdict.user_id)
        if locked:
            log.warning("locked out", extra={"session_id": ref.session_id, "subject": locked, "camera": ref.camera_id})
            return Verdict(False, ["locked_out"], "locked_out", score=verdict.score, frames_seen=verdict.frames_seen,
                           frames_eligible=verdict.frames_eligible, votes=verdict.votes)
        candidate = max(verdict.votes, key=verdict.votes.get) if verdict.votes else ""
        self.limits.record(session_key(ref), ref.camera_id, verdict.rule, verdict.approve, verdict.user_id or candidate)
        return verdict

    def _decision_emit(self, state: SessionState, verdict: Verdict) -> Emit:
        ref = state.meta
        now_ms = int(time.time() * 1000)
        first_ms = min((r.received_ms for r in state.results if r.received_ms), default=ref.received_ms)
        event = {
            "schema": "facepay.decision.v1",
            "event_id": f"{self.settings.namespace}:{session_key(ref)}",
            "session_id": ref.session_id,
            "store_id": ref.store_id,
            "camera_id": ref.camera_id,
            "tenant_id": ref.tenant_id,
            "decision": "approve" if verdict.approve else "decline",
            "user_id": verdict.user_id if verdict.approve else "",
            "score": round(verdict.score, 4),
            "threshold": round(self.threshold, 4),
            "threshold_source": self.threshold_source,
            "margin": round(float(self.policy.margin), 4),
            "min_agreeing_frames": int(self.policy.min_agreeing_frames),
            "template_space": self.space_id,
            "reasons": verdict.reasons,
            "rule": verdict.rule,
            "model_ids": {**state.models, "recognizer": self.embedder.model_id},
            # Named in the signed event, so a backend sees a decision taken by a non-commercial model.
            "non_commercial_models": [self.embedder.model_id] if self.non_commercial else [],
            "first_frame_ms": first_ms,
            "decided_at_ms": now_ms,
            "frames_seen": verdict.frames_seen,
            "frames_eligible": verdict.frames_eligible,
        }
        metrics.DECISIONS.labels(event["decision"], verdict.rule).inc()
        if first_ms:
            metrics.DECISION_LATENCY.observe(max(now_ms - first_ms, 0) / 1000)
        log.info("decision", extra={"session_id": ref.session_id, "store_id": ref.store_id,
                                    "decision": event["decision"], "rule": verdict.rule, "votes": _loggable_votes(verdict)})
        payload = sign(event, self.settings.signing_key, self.settings.signing_key_id)
        payload[b"store"] = ref.store_id.encode()
        payload[FIELD] = self._for_the_archive(ref, state, payload).encode()  # signed by the runtime
        return Emit("decisions", payload, once_key=decided_key(session_key(ref)))

    def _for_the_archive(self, ref: FrameRef, state: SessionState, signed: dict[bytes, bytes]) -> DecisionMsg:
        """The event as signed, each frame's scores and the rule in force, for the archiver."""
        frames = [{"sequence": r.sequence, "top_user": r.top_user, "top_score": round(float(r.top_score), 4),
                   "second_score": round(float(r.second_score), 4), "reason": r.reason}
                  for r in sorted(state.results, key=lambda r: r.sequence)]
        return DecisionMsg(ref=ref, payload=signed[b"payload"], signature=signed[b"sig"].decode(),
                           key_id=signed[b"kid"].decode(), frames=frames, policy=dataclasses.asdict(self.policy))

    # ---- enrollment ------------------------------------------------------------------------
    def _finish_enrollment(self, state: SessionState, timed_out: bool) -> list[Emit]:
        if not timed_out and (state.expected_frames is None or len(state.results) < state.expected_frames):
            return []
        ref = state.meta
        accepted = [r for r in state.results if r.embedding is not None]
        images = [{"index": r.sequence, "accepted": r.embedding is not None, "reason": r.reason}
                  for r in sorted(state.results, key=lambda r: r.sequence)]
        # The session id inside the signed body: the gateway matches the result to its request by it.
        result = {"session_id": ref.session_id, "user_id": ref.user_id, "tenant_id": ref.tenant_id,
                  "model_id": self.space_id, "images": images, "status": "rejected", "duplicate_of": "", "duplicate_score": 0.0}
        incomplete = state.expected_frames is None or len(state.results) < state.expected_frames
        if incomplete:
            log.warning("enrollment incomplete: nothing stored", extra={"session_id": ref.session_id, "user_id": ref.user_id})
        elif accepted:
            samples = np.asarray([r.embedding for r in accepted], dtype=np.float32)
            duplicate = self._duplicate_of(ref.user_id, ref.tenant_id, mean_template(samples))
            if duplicate:
                result.update(status="duplicate", duplicate_of=duplicate.user_id, duplicate_score=duplicate.score)
            else:
                store_templates(self.gallery, self.space_id, ref.user_id, ref.tenant_id, ref.phone_suffix, samples)
                self.face_sources.save(ref.user_id, ref.tenant_id, ref.phone_suffix, [r.chips or {} for r in accepted])
                result["status"] = "enrolled"
        log.info("enrollment", extra={"session_id": ref.session_id, "user_id": ref.user_id, "status": result["status"]})
        return [self._enrollment_emit(ref, result)]

    def _enrollment_emit(self, ref: FrameRef, result: dict) -> Emit:
        return Emit("enrollments", {b"m": msgpack.packb(result), b"session": ref.session_id.encode()},
                    once_key=decided_key(session_key(ref)))

    def _duplicate_of(self, user_id: str, tenant_id: str, mean: np.ndarray):
        hits = self.gallery.search(self.space_id, mean, limit=2, tenant=tenant_id or None)
        return next((h for h in hits if h.user_id != user_id and h.score >= self.threshold), None)


def _loggable_votes(verdict: Verdict) -> dict[str, int] | list[int]:
    """An approval's votes name the payer (as its event does); a decline's are counts only: a
    decline must not put the name of someone who did not pay in the logs."""
    return verdict.votes if verdict.approve else sorted(verdict.votes.values(), reverse=True)
