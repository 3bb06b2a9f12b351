"""The session rule: from the per-frame results of one payment session to one decision.

Pure functions over `FrameResult`s, so the rule can be read and tested without Redis or
models. The recognizer stage calls `decide` each time a session gets a new frame result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from facepay.config import SessionPolicy


@dataclass(frozen=True)
class FrameResult:
    """What the recognizer learnt from one frame."""

    sequence: int
    received_ms: int = 0
    reason: str = ""  # set when the frame cannot vote: no_face, pose_yaw, …
    ear: float | None = None  # mean eye aspect ratio, when the eyes were found
    top_user: str = ""
    top_score: float = -1.0
    second_score: float = -1.0
    embedding: list[float] | None = None  # kept for enrollment sessions only
    antispoof: float | None = None  # passive per-frame P(real), when the aligner scored it
    chips: dict[str, bytes] | None = None  # enrollment only: the aligned chips, kept for re-indexing

    @property
    def eligible(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Verdict:
    approve: bool
    reasons: list[str]
    rule: str  # the rule that decided: matched, no_face, timeout, …
    user_id: str = ""
    score: float = 0.0
    frames_seen: int = 0
    frames_eligible: int = 0
    votes: dict[str, int] = field(default_factory=dict)


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
    for i in np.flatnonzero(closed):
        if opened[:i].any() and opened[i + 1 :].any():
            return True
    return False


def decide(
    results: list[FrameResult],
    policy: SessionPolicy,
    threshold: float,
    expected_frames: int | None,
    timed_out: bool = False,
) -> Verdict | None:
    """A verdict once the rules allow one, else None (wait for more frames)."""
    results = sorted(results, key=lambda r: r.sequence)
    complete = timed_out or (expected_frames is not None and len(results) >= expected_frames)
    eligible = [r for r in results if r.eligible]
    votes = Counter(
        r.top_user for r in eligible if r.top_score >= threshold and r.top_score - r.second_score >= policy.margin
    )
    blinked = blink_seen([r.ear for r in results if r.ear is not None], policy)
    counts = dict(votes)
    base = {"frames_seen": len(results), "frames_eligible": len(eligible), "votes": counts}

    winner, agreeing = votes.most_common(1)[0] if votes else ("", 0)
    disagreeing = sum(votes.values()) - agreeing
    agreed = agreeing >= policy.min_agreeing_frames and disagreeing <= policy.max_disagreeing_ratio * sum(votes.values())
    passive_ok = _passive_liveness_ok(eligible, policy)
    if agreed and (blinked or not policy.require_blink) and passive_ok and (complete or policy.decide_early):
        score = float(np.median([r.top_score for r in eligible if r.top_user == winner and r.top_score >= threshold]))
        return Verdict(True, ["matched"], "matched", user_id=winner, score=score, **base)
    if not complete:
        return None
    best = max((r.top_score for r in eligible), default=0.0)
    reason = _decline_reason(results, eligible, votes, agreed, blinked, threshold, timed_out, expected_frames, passive_ok)
    return Verdict(False, [reason], reason, score=max(best, 0.0), **base)


def _passive_liveness_ok(eligible: list[FrameResult], policy: SessionPolicy) -> bool:
    """The median passive anti-spoof score of the voting frames, when that rule is on."""
    if policy.min_passive_liveness is None:
        return True
    scores = [r.antispoof for r in eligible if r.antispoof is not None]
    return bool(scores) and float(np.median(scores)) >= policy.min_passive_liveness


def _decline_reason(results, eligible, votes, agreed, blinked, threshold, timed_out, expected, passive_ok=True) -> str:
    if agreed and not blinked:
        return "no_liveness"
    if agreed and not passive_ok:
        return "spoof_suspected"
    if timed_out and (expected is None or len(results) < expected) and not results:
        return "timeout"
    if not eligible:
        rejected = Counter(r.reason for r in results)
        if not rejected:
            return "timeout"
        if any(reason.startswith("pose_") for reason in rejected):
            return "not_frontal"
        return rejected.most_common(1)[0][0]
    if not votes:
        near = any(r.top_score >= threshold for r in eligible)
        return "ambiguous_match" if near else "unknown_face"
    if len(votes) > 1:
        return "ambiguous_match"
    if timed_out and expected is None:
        return "timeout"
    return "too_few_frames"
