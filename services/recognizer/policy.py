"""The session rule: from the per-frame results of one payment session to one decision.

Pure functions over `FrameResult`s, so the rule can be read and tested without Redis or
models. The recognizer stage calls `decide` each time a session gets a new frame result.
Liveness is judged on the matched face's own track (`face_track`), never on other faces seen
in the same session.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from facepay.config import SessionPolicy
from facepay.vocabulary import POSE_REASONS, Reason

FIRST_SHIPPED_MARGIN = 0.02
FIRST_SHIPPED_MIN_AGREEING_FRAMES = 3

_T = TypeVar("_T")


def resolved(value: _T | None, setting: str) -> _T:
    """A policy setting that the template space fills in (`SessionPolicy.for_space`)."""
    if value is None:
        raise ValueError(f"policy.{setting} is unset: the policy was not resolved for a template space (for_space)")
    return value


@dataclass(frozen=True)
class FrameResult:
    """What the recognizer learnt from one frame."""

    sequence: int
    received_ms: int = 0
    reason: Reason | str = ""  # set when the frame cannot vote: no_face, pose_yaw, … (a stage's code as it wrote it)
    ear: float | None = None  # mean eye aspect ratio, when the eyes were found
    top_user: str = ""
    top_score: float = -1.0
    second_score: float = -1.0
    # Who scored `second_score` (for the audit archive; the rule reads the score only). A state
    # written by an older recognizer has no such field: it loads with "".
    second_user: str = ""
    # Enrollment: the template's sample. Payment: what ties a frame to the matched face's track.
    # Biometric data: it lives in the session state only until the decision is written.
    embedding: list[float] | None = None
    antispoof: float | None = None  # passive per-frame P(real), when the aligner scored it
    chips: dict[str, bytes] | None = None  # enrollment only: the aligned chips, kept for re-indexing

    @property
    def eligible(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Verdict:
    approve: bool
    reasons: list[Reason | str]
    rule: Reason | str  # the rule that decided: matched, no_face, timeout, … (or a frame's reason, passed on)
    user_id: str = ""
    score: float = 0.0
    frames_seen: int = 0
    frames_eligible: int = 0
    votes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleInForce:
    """The session rule of one template space as decisions apply and name it: the policy with
    the space's margin and k, the space's threshold, and where that threshold came from."""

    space_id: str
    threshold: float
    threshold_source: str  # "setting", "calibrated" or "model default"
    policy: SessionPolicy


def blink_seen(ears: list[float], policy: SessionPolicy) -> bool:
    """Eyes open, then closed, then open again, relative to this session's open-eye level.

    Relative thresholds, because resting EAR varies from person to person (and with the
    landmark model); a still photo replayed over and over never dips, so it never blinks.
    """
    if len(ears) < 3:
        return False
    series = np.asarray(ears, dtype=float)
    open_level = float(np.percentile(series, 90))
    if open_level <= 0.0:
        return False
    closed = series <= policy.blink_closed_ratio * open_level
    opened = series >= policy.blink_open_ratio * open_level
    return any(opened[:i].any() and opened[i + 1 :].any() for i in np.flatnonzero(closed))


def decide(
    results: list[FrameResult],
    policy: SessionPolicy,
    threshold: float,
    expected_frames: int | None,
    timed_out: bool = False,
) -> Verdict | None:
    """A verdict once the rules allow one, else None (wait for more frames)."""
    tally = count_session(results, policy, threshold, expected_frames, timed_out)
    base: dict[str, Any] = {
        "frames_seen": len(tally.results),
        "frames_eligible": len(tally.eligible),
        "votes": dict(tally.votes),
    }
    live = (tally.blinked or not policy.require_blink) and tally.passive_ok
    if tally.agreed and not tally.face_changed and live and (tally.complete or policy.decide_early):
        scores = [r.top_score for r in tally.eligible if r.top_user == tally.winner and r.top_score >= threshold]
        score = float(np.median(scores))
        return Verdict(True, [Reason.MATCHED], Reason.MATCHED, user_id=tally.winner, score=score, **base)
    if not tally.complete:
        return None
    best = max((r.top_score for r in tally.eligible), default=0.0)
    reason = _decline_reason(tally, policy, threshold)
    return Verdict(False, [reason], reason, score=max(best, 0.0), **base)


@dataclass(frozen=True)
class Tally:
    """What the rule counted in one session: the facts both the approval and the reason read."""

    results: list[FrameResult]  # every frame result, in sequence order
    eligible: list[FrameResult]  # the frames that may vote (a face, frontal)
    votes: Counter[str]  # user → frames that named them above the threshold with the margin
    winner: str  # the user with the most votes ("" when none)
    agreed: bool  # enough votes for the winner, few enough for anyone else
    track: list[FrameResult]  # the winner's face track: its voting frames and frames of the same face
    face_changed: bool  # an eligible frame shows someone other than the winner's face
    blinked: bool  # a blink on the track's frames
    passive_ok: bool  # the passive anti-spoof rule holds on the track's eligible frames (or is off)
    timed_out: bool
    expected_frames: int | None  # the frame count the camera announced, once it has

    @property
    def complete(self) -> bool:
        return self.timed_out or (self.expected_frames is not None and len(self.results) >= self.expected_frames)


def count_session(
    results: list[FrameResult],
    policy: SessionPolicy,
    threshold: float,
    expected_frames: int | None,
    timed_out: bool = False,
) -> Tally:
    # The recognizer passes its template space's margin and k; a bare policy gets the first shipped rule.
    policy = policy.for_space(FIRST_SHIPPED_MARGIN, FIRST_SHIPPED_MIN_AGREEING_FRAMES)
    results = sorted(results, key=lambda r: r.sequence)
    eligible = [r for r in results if r.eligible]
    votes = Counter(r.top_user for r in eligible if _votes_for(r, r.top_user, threshold, policy))
    winner, agreeing = votes.most_common(1)[0] if votes else ("", 0)
    disagreeing = sum(votes.values()) - agreeing
    agreed = agreeing >= resolved(
        policy.min_agreeing_frames, "min_agreeing_frames"
    ) and disagreeing <= policy.max_disagreeing_ratio * sum(votes.values())
    track, face_changed = face_track(results, winner, threshold, policy)
    # Liveness is judged on the matched face only: another face's blink proves nothing about it.
    blinked = blink_seen([r.ear for r in track if r.ear is not None], policy)
    passive_ok = _passive_liveness_ok([r for r in track if r.eligible], policy)
    return Tally(
        results, eligible, votes, winner, agreed, track, face_changed, blinked, passive_ok, timed_out, expected_frames
    )


def face_track(
    results: list[FrameResult],
    winner: str,
    threshold: float,
    policy: SessionPolicy,
) -> tuple[list[FrameResult], bool]:
    """The frames of the winner's face, and whether an eligible frame clearly shows someone else.

    The track is the frames that voted for the winner plus every frame (eligible or rejected
    for pose) whose embedding is the same person as their centroid, so the eyes-closed frame of
    a blink belongs to it even when it scores below the threshold against the gallery. A frame
    without an embedding, or a pose-rejected frame of another face, is simply not on the track;
    an eligible (frontal, well-seen) frame of another face means the face changed mid-session.
    """
    if not winner:
        return [], False
    voters = [r for r in results if _votes_for(r, winner, threshold, policy)]
    centroid = _unit_mean([r.embedding for r in voters if r.embedding is not None])
    level = same_person_level(threshold)
    voting = {id(r) for r in voters}
    track, face_changed = [], False
    for r in results:
        if id(r) in voting:
            track.append(r)
        elif centroid is not None and r.embedding is not None:
            if float(np.dot(_unit(r.embedding), centroid)) >= level:
                track.append(r)
            elif r.eligible:
                face_changed = True
    return track, face_changed


def same_person_level(threshold: float) -> float:
    """Cosine to the track's centroid at which a frame is the same person.

    The calibrated threshold is the system's own definition of "same person" at its target
    FAR, so a frame under it is another face. Within one session (one camera, one light) the
    same person scores far above it: on the selfie clip every frame, eyes shut included, is at
    ≥ 0.994 of the centroid against a threshold of 0.943, and the closest stranger of the test
    faces at 0.917.
    """
    return threshold


def _votes_for(r: FrameResult, user: str, threshold: float, policy: SessionPolicy) -> bool:
    return (
        bool(user)
        and r.eligible
        and r.top_user == user
        and r.top_score >= threshold
        and r.top_score - r.second_score >= resolved(policy.margin, "margin")
    )


def _unit(vector: list[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _unit_mean(vectors: list[list[float]]) -> np.ndarray | None:
    return _unit(np.mean([_unit(v) for v in vectors], axis=0).tolist()) if vectors else None


def _passive_liveness_ok(eligible: list[FrameResult], policy: SessionPolicy) -> bool:
    """The median passive anti-spoof score of the matched face's frames, when that rule is on."""
    if policy.min_passive_liveness is None:
        return True
    scores = [r.antispoof for r in eligible if r.antispoof is not None]
    return bool(scores) and float(np.median(scores)) >= policy.min_passive_liveness


def _decline_reason(tally: Tally, policy: SessionPolicy, threshold: float) -> Reason | str:
    """The first rule the session failed, most telling first (only rules the policy has on)."""
    if tally.agreed and tally.face_changed:
        return Reason.FACE_CHANGED
    if tally.agreed and policy.require_blink and not tally.blinked:
        return Reason.NO_LIVENESS
    if tally.agreed and not tally.passive_ok:
        return Reason.SPOOF_SUSPECTED
    results, eligible, votes, expected = tally.results, tally.eligible, tally.votes, tally.expected_frames
    if tally.timed_out and (expected is None or len(results) < expected) and not results:
        return Reason.TIMEOUT
    if not eligible:
        rejected = Counter(r.reason for r in results)
        if not rejected:
            return Reason.TIMEOUT
        if any(reason in POSE_REASONS for reason in rejected):
            return Reason.NOT_FRONTAL
        return rejected.most_common(1)[0][0]
    if not votes:
        near = any(r.top_score >= threshold for r in eligible)
        return Reason.AMBIGUOUS_MATCH if near else Reason.UNKNOWN_FACE
    if len(votes) > 1:
        return Reason.AMBIGUOUS_MATCH
    if tally.timed_out and expected is None:
        return Reason.TIMEOUT
    return Reason.TOO_FEW_FRAMES
