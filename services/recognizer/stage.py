"""Recognizer: embed each eligible face, search the gallery 1:N, vote over the frames of a
payment session, and emit one signed payment-authorization event per session.

Enrollment sessions travel the same stages; here their accepted faces become the user's
template (the L2-normalised mean embedding, with each embedding kept as a sample).

The stage orchestrates; each job has its own home: the gallery and the rule in force for its
template space (`gallery_owner.py`), operator commands (`admin.py`), the session rule
(`policy.py`), session state (`state.py`), failure limits (`limits.py`), the enrollment gate and
templates (`enrollment.py`), and the signed events (`events.py`).
"""

from __future__ import annotations

import logging
from typing import TypeGuard

import numpy as np

from facepay.config import SessionPolicy, Settings
from facepay.gallery import Gallery
from facepay.images import decode_trusted
from facepay.keys import TrustedKeys
from facepay.messages import AdminMsg, EmbeddingMsg, FrameRef, Message, PosedMsg, Rejection, SessionEndMsg
from facepay.models.registry import recognizer_defaults
from facepay.runtime.envelope import origin_problem
from facepay.runtime.redis_conn import TRANSIENT, connect
from facepay.runtime.stage import Emit, Stage
from facepay.vocabulary import EnrollmentStatus, Purpose, Reason
from services.recognizer.admin import admin_problem, handle_admin
from services.recognizer.embedder import load_embedder, template_space
from services.recognizer.enrollment import mean_template, quality_problem
from services.recognizer.events import DecisionEvents, enrollment_result
from services.recognizer.gallery_owner import GalleryOwner
from services.recognizer.limits import FailureLimiter
from services.recognizer.policy import FrameResult, Verdict, decide
from services.recognizer.state import SessionState, SessionStore, UnreadableState, session_key

log = logging.getLogger(__name__)


class RecognizerStage(Stage):
    name = "recognizer"
    input = "posed"
    # Frames come from the pose stage (and carry the gateway's attestation); commands from the operator.
    accepts_from = {**{t: frozenset({"pose"}) for t in ("posed", "rejection", "end")}, "admin": frozenset({"operator"})}
    uses_device = True

    def __init__(self, settings: Settings, gallery: Gallery | None = None) -> None:
        self.settings = settings
        self._gallery = gallery  # opened from settings.gallery_url at start when not given

    def start(self) -> None:
        if not self.settings.signing_key:
            raise ValueError("FACEPAY_SIGNING_KEY is not set: decisions must be signed")
        self.embedder = load_embedder(self.settings.recognizer_model, self.settings.device)
        defaults = recognizer_defaults(self.embedder.model_id, self.embedder.default_threshold)
        client = connect(self.settings.redis_url)
        # The vectors' space: the recognizer and the landmarks its chips were aligned with.
        # Threshold, margin and k belong to it: setting > session calibration > the model's default.
        space_id = template_space(self.embedder.model_id, self.settings.landmarks_model)
        self.gallery_owner = GalleryOwner.open(
            self.settings, client, space_id, self.embedder.dim, self.embedder.default_threshold, defaults, self._gallery
        )
        self.sessions = SessionStore(client, self.settings)
        self.limits = FailureLimiter(client, self.settings)
        non_commercial = defaults.non_commercial or getattr(self.embedder, "non_commercial", False)
        if non_commercial:
            # An operator never runs a non-commercial model without being told, at every start.
            log.warning(
                "NON-COMMERCIAL MODEL: %s",
                getattr(self.embedder, "licence_notice", defaults.licence),
                extra={"model_id": self.embedder.model_id},
            )
        self.events = DecisionEvents(self.settings, self.embedder.model_id, non_commercial)
        # Sessions decided in the last batch or tick → what to do with their state once the
        # runtime has written the decision ("forget" or "quarantine"); see `_settle_decided`.
        self._decided_last_turn: dict[str, str] = {}

    def stop(self) -> None:
        owner = getattr(self, "gallery_owner", None)
        if owner:
            owner.close()
        elif self._gallery:
            self._gallery.close()

    @property
    def threshold(self) -> float:
        return self.gallery_owner.in_force.threshold

    @property
    def policy(self) -> SessionPolicy:
        """The session rule with this template space's margin and k."""
        return self.gallery_owner.in_force.policy

    def refuse(self, message: Message, trusted: TrustedKeys) -> str:
        """The chain: pose signed the entry (checked by the runtime) and the gateway attested the
        frame's origin, recently. Admin commands: fresh and never seen before."""
        if isinstance(message, AdminMsg):
            return admin_problem(self.gallery_owner, message)
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
                emits += self._for_the_archive_embedding(message.ref, result)
        for key in dict.fromkeys(session_key(m.ref) for m in live):
            emits += self._evaluate(key, timed_out=False)
        return emits

    def tick(self) -> list[Emit]:
        """Decline sessions whose frames stopped coming; forget the ones already decided; let
        the gallery's owner pick up a new calibrated rule and keep its index built."""
        self.gallery_owner.maintain()
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

    # ---- frames ----------------------------------------------------------------------------
    def _to_embed(self, message: Message) -> TypeGuard[PosedMsg]:
        """Every face that may vote; and, in payment sessions, faces rejected for pose, so that
        the rule can tell whether their eyes are the matched face's."""
        if not isinstance(message, PosedMsg):
            return False
        pose_rejected_payer = message.ref.purpose != Purpose.ENROLL and self.embedder.chip_template in message.chips
        return message.eligible or pose_rejected_payer

    def _embed(self, faces: list[PosedMsg]) -> dict[int, np.ndarray]:
        if not faces:
            return {}
        template = self.embedder.chip_template
        chips = [decode_trusted(m.chips[template]) for m in faces]
        vectors = self.embedder.embed(chips)
        return {id(m): v for m, v in zip(faces, vectors, strict=True)}

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
            return FrameResult(
                ref.sequence, ref.received_ms, reason=message.reason or Reason.NOT_FRONTAL, ear=ear, embedding=embedding
            )
        if ref.purpose == Purpose.ENROLL:
            problem = quality_problem(message, self.settings)
            if problem:
                return FrameResult(ref.sequence, ref.received_ms, reason=problem, ear=ear)
            return FrameResult(
                ref.sequence,
                ref.received_ms,
                ear=ear,
                embedding=embedding,
                antispoof=message.antispoof,
                chips=message.chips,
            )
        hits = self.gallery_owner.search(vector, ref.tenant_id, ref.phone_suffix)
        top = hits[0] if hits else None
        second = hits[1] if len(hits) > 1 else None
        return FrameResult(
            ref.sequence,
            ref.received_ms,
            ear=ear,
            top_user=top.user_id if top else "",
            top_score=top.score if top else -1.0,
            second_score=second.score if second else -1.0,
            second_user=second.user_id if second else "",
            antispoof=message.antispoof,
            embedding=embedding,
        )

    # ---- sessions --------------------------------------------------------------------------
    def _evaluate(self, key: str, timed_out: bool) -> list[Emit]:
        try:
            state = self.sessions.load(key)
        except UnreadableState as unreadable:
            return self._decline_unreadable(key, unreadable)
        if state is None:
            self.sessions.close(key)
            return []
        if state.meta.purpose == Purpose.ENROLL:
            emits = self._finish_enrollment(state, timed_out)
        else:
            rule = self.gallery_owner.in_force
            verdict = decide(state.results, rule.policy, rule.threshold, state.expected_frames, timed_out)
            if verdict is None:
                return []
            verdict = self._apply_failure_limits(state, verdict)
            emits = [self.events.decision(state, verdict, rule)]
        if emits:
            self._decided_last_turn[key] = "forget"
        return emits

    def _decline_unreadable(self, key: str, unreadable: UnreadableState) -> list[Emit]:
        """A session whose state cannot be read can never be approved: decline it (the point of
        sale gets an answer), then move the state aside for an operator."""
        log.error("unreadable session state", extra={"session_id": key, "error": str(unreadable)})
        store_id, _, session_id = key.partition("/")
        meta = self.sessions.meta(key) or FrameRef(session_id, store_id, "", 0, 0)
        self._decided_last_turn[key] = "quarantine"
        if meta.purpose == Purpose.ENROLL:
            return [self.events.enrollment(meta, enrollment_result(meta, self.gallery_owner.space_id))]
        verdict = Verdict(False, [Reason.UNREADABLE_STATE], Reason.UNREADABLE_STATE)
        return [self.events.decision(SessionState(meta, [], None, {}), verdict, self.gallery_owner.in_force)]

    def _apply_failure_limits(self, state: SessionState, verdict: Verdict) -> Verdict:
        ref = state.meta
        locked = self.limits.locked(ref.camera_id, verdict.user_id)
        if locked:
            log.warning("locked out", extra={"session_id": ref.session_id, "subject": locked, "camera": ref.camera_id})
            return Verdict(
                False,
                [Reason.LOCKED_OUT],
                Reason.LOCKED_OUT,
                score=verdict.score,
                frames_seen=verdict.frames_seen,
                frames_eligible=verdict.frames_eligible,
                votes=verdict.votes,
            )
        candidate = max(verdict.votes, key=verdict.votes.__getitem__) if verdict.votes else ""
        self.limits.record(session_key(ref), ref.camera_id, verdict.rule, verdict.approve, verdict.user_id or candidate)
        return verdict

    def _for_the_archive_embedding(self, ref: FrameRef, result: FrameResult) -> list[Emit]:
        """With archive_keep_embeddings, a payment face's embedding goes to the archiver on a
        stream of its own (written in the same transaction as, or before, the decision)."""
        if not self.settings.archive_keep_embeddings or ref.purpose == Purpose.ENROLL or result.embedding is None:
            return []
        return [
            Emit(
                "embeddings",
                EmbeddingMsg(ref=ref, vector=result.embedding, space=self.gallery_owner.space_id).encode(),
                partition_key=session_key(ref),
            )
        ]

    # ---- enrollment ------------------------------------------------------------------------
    def _finish_enrollment(self, state: SessionState, timed_out: bool) -> list[Emit]:
        if not timed_out and (state.expected_frames is None or len(state.results) < state.expected_frames):
            return []
        ref = state.meta
        owner = self.gallery_owner
        accepted = [r for r in state.results if r.embedding is not None]
        images = [
            {"index": r.sequence, "accepted": r.embedding is not None, "reason": r.reason}
            for r in sorted(state.results, key=lambda r: r.sequence)
        ]
        result = enrollment_result(ref, owner.space_id, images)
        incomplete = state.expected_frames is None or len(state.results) < state.expected_frames
        if incomplete:
            log.warning(
                "enrollment incomplete: nothing stored", extra={"session_id": ref.session_id, "user_id": ref.user_id}
            )
        elif accepted:
            samples = np.asarray([r.embedding for r in accepted], dtype=np.float32)
            duplicate = owner.duplicate_of(ref.user_id, ref.tenant_id, mean_template(samples))
            if duplicate:
                result.update(
                    status=EnrollmentStatus.DUPLICATE, duplicate_of=duplicate.user_id, duplicate_score=duplicate.score
                )
            else:
                owner.enroll(ref.user_id, ref.tenant_id, ref.phone_suffix, samples, [r.chips or {} for r in accepted])
                result["status"] = EnrollmentStatus.ENROLLED
        log.info("enrollment", extra={"session_id": ref.session_id, "user_id": ref.user_id, "status": result["status"]})
        return [self.events.enrollment(ref, result)]
