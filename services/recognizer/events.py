"""What the recognizer writes when a session is decided.

A payment session: one decision event on `{ns}:decisions`, HMAC-signed for the payment
backends (see "The session rule and the decision event" in the README), and nothing else there:
backends read that stream in full. Beside it, in the same once-only write, the decision record
for the archiver on `{ns}:decision-records` (ACL: the archiver alone reads it): the event as
signed, what the recognizer saw of each frame (its two nearest users and their scores — whom
the payer's face resembled, a backend's business in no session) and the rule in force. An
enrollment: its result, matched by the gateway to its request by the session id inside the
signed body. Both are written once per session (`once_key`), whichever replica decides it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import msgpack

from facepay.config import Settings
from facepay.messages import DecisionMsg, FrameRef
from facepay.runtime import metrics
from facepay.runtime.stage import Emit
from facepay.signing import sign
from facepay.vocabulary import Decision, EnrollmentStatus
from services.recognizer.policy import RuleInForce, Verdict, resolved
from services.recognizer.state import SessionState, decided_key, session_key

log = logging.getLogger(__name__)

EVENT_SCHEMA = "facepay.decision.v1"


class DecisionEvents:
    """Builds and signs decision events with this recognizer's model and signing key."""

    def __init__(self, settings: Settings, recognizer_model: str, non_commercial: bool) -> None:
        self.settings = settings
        self.recognizer_model = recognizer_model
        self.non_commercial = non_commercial

    def decision(self, state: SessionState, verdict: Verdict, rule: RuleInForce) -> Emit:
        ref = state.meta
        now_ms = int(time.time() * 1000)
        first_ms = min((r.received_ms for r in state.results if r.received_ms), default=ref.received_ms)
        event = {
            "schema": EVENT_SCHEMA,
            "event_id": f"{self.settings.namespace}:{session_key(ref)}",
            "session_id": ref.session_id,
            "store_id": ref.store_id,
            "camera_id": ref.camera_id,
            "tenant_id": ref.tenant_id,
            "decision": Decision.APPROVE if verdict.approve else Decision.DECLINE,
            "user_id": verdict.user_id if verdict.approve else "",
            "score": round(verdict.score, 4),
            "threshold": round(rule.threshold, 4),
            "threshold_source": rule.threshold_source,
            "margin": round(resolved(rule.policy.margin, "margin"), 4),
            "min_agreeing_frames": resolved(rule.policy.min_agreeing_frames, "min_agreeing_frames"),
            "template_space": rule.space_id,
            "reasons": verdict.reasons,
            "rule": verdict.rule,
            "model_ids": {**state.models, "recognizer": self.recognizer_model},
            # Named in the signed event, so a backend sees a decision taken by a non-commercial model.
            "non_commercial_models": [self.recognizer_model] if self.non_commercial else [],
            "first_frame_ms": first_ms,
            "decided_at_ms": now_ms,
            "frames_seen": verdict.frames_seen,
            "frames_eligible": verdict.frames_eligible,
        }
        metrics.DECISIONS.labels(event["decision"], verdict.rule).inc()
        if first_ms:
            metrics.DECISION_LATENCY.observe(max(now_ms - first_ms, 0) / 1000)
        log.info(
            "decision",
            extra={
                "session_id": ref.session_id,
                "store_id": ref.store_id,
                "decision": event["decision"],
                "rule": verdict.rule,
                "votes": _loggable_votes(verdict),
            },
        )
        payload = sign(event, self.settings.signing_key, self.settings.signing_key_id)
        payload[b"store"] = ref.store_id.encode()
        record = Emit(
            "decision-records",
            _for_the_archive(ref, state, payload, rule).encode(),  # signed by the runtime
            partition_key=session_key(ref),
        )
        return Emit(
            "decisions",
            payload,
            once_key=decided_key(session_key(ref)),
            partition_key=session_key(ref),
            beside=(record,),
        )

    def enrollment(self, ref: FrameRef, result: dict) -> Emit:
        """`result` as `enrollment_result` starts it."""
        return Emit(
            "enrollments",
            {b"m": msgpack.packb(result), b"session": ref.session_id.encode()},
            once_key=decided_key(session_key(ref)),
            partition_key=session_key(ref),
        )


def enrollment_result(ref: FrameRef, space_id: str, images: list[dict] | None = None) -> dict:
    """An enrollment's result, rejected until its templates are stored. The session id is inside
    the signed body: the gateway matches the result to its request by it."""
    return {
        "session_id": ref.session_id,
        "user_id": ref.user_id,
        "tenant_id": ref.tenant_id,
        "model_id": space_id,
        "images": images or [],
        "status": EnrollmentStatus.REJECTED,
        "duplicate_of": "",
        "duplicate_score": 0.0,
    }


def _for_the_archive(ref: FrameRef, state: SessionState, signed: dict[bytes, bytes], rule: RuleInForce) -> DecisionMsg:
    """The decision record: the event as signed, each frame's two best users and their scores
    and the rule in force, for the archiver (never on the stream backends read)."""
    frames = [
        {
            "sequence": r.sequence,
            "top_user": r.top_user,
            "top_score": round(float(r.top_score), 4),
            "second_user": r.second_user,
            "second_score": round(float(r.second_score), 4),
            "reason": r.reason,
        }
        for r in sorted(state.results, key=lambda r: r.sequence)
    ]
    return DecisionMsg(
        ref=ref,
        payload=signed[b"payload"],
        signature=signed[b"sig"].decode(),
        key_id=signed[b"kid"].decode(),
        frames=frames,
        policy=dataclasses.asdict(rule.policy),
    )


def _loggable_votes(verdict: Verdict) -> dict[str, int] | list[int]:
    """An approval's votes name the payer (as its event does); a decline's are counts only: a
    decline must not put the name of someone who did not pay in the logs."""
    return verdict.votes if verdict.approve else sorted(verdict.votes.values(), reverse=True)
