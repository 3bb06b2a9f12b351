"""Calibrate what a payment actually is: the session, not the comparison.

A payment is approved by the session rule (services/recognizer/policy.py `decide`) over the
frames of one session, against a gallery of mean templates. Its error rates are not the
per-comparison FAR/FRR of facepay/app/calibration.py: they depend on the threshold, the margin
over the second-best user, and k (frames that must agree) together, and on the gallery size.
This module measures them the way an operator meets them, with the same code:

- **Enrolment**: each person's first `enrol` usable, frontal photos (by file name; enrollment's
  gates) → the L2-normalised mean (`services/recognizer/enrollment.py: mean_template`).
- **Genuine sessions**: a person with at least `enrol + frames` photos gives sessions of
  `frames` of their *other* photos (consecutive by name, a remainder shorter than `frames`
  dropped), run against the gallery of everyone (the largest gallery: the hardest margin).
  A photo without a usable face, or one the pose gate refuses, is such a frame in the session
  too (`no_face`, `pose_yaw`, …), as it would be in the pipeline.
- **Stranger sessions** (open set): people are split into `folds` (seeded); for each fold its
  people are left out of the gallery and all their photos, in sessions of `frames`, are
  presented. Each person is a stranger exactly once, against a gallery of everyone else.
- Every session is decided by `decide(...)` with a `SessionPolicy` of the grid point and
  `require_blink=False`, `expected_frames=frames`: **photos cannot blink**, so liveness is out
  of this measurement (it only ever declines more). Photos of a person taken years apart stand
  in for the frames of one video session: harder than real sessions, whose frames are nearly
  alike, so the figures are pessimistic for FRR. The rule's `face_changed` check (every frontal
  frame must be the matched face) is part of the rule and is measured with it.

Session FRR = genuine sessions not approved for their own person; session FAR = stranger
sessions approved for anyone. A genuine session approved as someone else (misidentification)
counts as a false reject and, separately, as a false accept (`wrong_user`). Each rate comes
with its 80 % Clopper–Pearson upper bound (facepay/app/calibration.py).

The policy chosen: among the grid points with no stranger session and no genuine session
approved as someone else, the lowest session FRR; ties go to the larger k, then the larger
margin, then the middle threshold of what remains (furthest from both edges of the plateau).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepay.app.calibration import CONFIDENCE, SPLIT_SEED, Embedded, Rate, pair_scores, tar_at_far
from facepay.config import SessionPolicy
from facepay.vocabulary import Reason
from services.recognizer.enrollment import mean_template
from services.recognizer.policy import FrameResult, decide

DEFAULT_MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15)
TARGET_FRR = 0.02


@dataclass(frozen=True)
class SessionDesign:
    enrol: int = 3  # photos per enrolled person (mean template)
    frames: int = 3  # photos per session
    folds: int = 5  # stranger folds: each person left out of the gallery once
    seed: int = SPLIT_SEED
    apply_pose_gate: bool = True  # frames the pose stage refuses cannot vote (as in the pipeline)


@dataclass(frozen=True)
class PhotoSession:
    subject: str
    rows: tuple[int, ...]  # rows of the embedded data set, in frame order
    genuine: bool
    gallery: int  # -1: everyone enrolled; f ≥ 0: everyone but fold f


@dataclass(frozen=True)
class Gallery:
    users: list[str]
    templates: np.ndarray  # (len(users), dim) float32, unit rows


@dataclass
class SessionSet:
    """The galleries and sessions one design makes of one embedded data set."""

    design: SessionDesign
    galleries: dict[int, Gallery]
    sessions: list[PhotoSession]
    enrolment_rows: dict[str, list[int]]
    frames: dict[tuple[int, int], FrameResult] = field(default_factory=dict)  # (gallery, row) → result

    @property
    def genuine(self) -> list[PhotoSession]:
        return [s for s in self.sessions if s.genuine]

    @property
    def strangers(self) -> list[PhotoSession]:
        return [s for s in self.sessions if not s.genuine]


def _frame_ok(data: Embedded, row: int, design: SessionDesign) -> bool:
    return bool(data.usable[row]) and not (design.apply_pose_gate and data.pose_reasons[row])


def build_sessions(data: Embedded, design: SessionDesign = SessionDesign()) -> SessionSet:
    """Galleries (everyone; everyone but fold f) and sessions (genuine, stranger) of a data set."""
    by_person: dict[str, list[int]] = {}
    for row in sorted(range(len(data.labels)), key=lambda r: (data.labels[r], data.paths[r].name)):
        by_person.setdefault(data.labels[row], []).append(row)
    enrolment = {p: [r for r in rows if _frame_ok(data, r, design)][: design.enrol] for p, rows in by_person.items()}
    enrolment = {p: rows for p, rows in enrolment.items() if rows}
    people = sorted(by_person)
    rng = np.random.default_rng(design.seed)
    fold_of = {
        p: int(f)
        for p, f in zip(
            [people[i] for i in rng.permutation(len(people))], np.arange(len(people)) % design.folds, strict=True
        )
    }

    def gallery(without_fold: int) -> Gallery:
        users = [p for p in people if p in enrolment and fold_of[p] != without_fold]
        templates = np.stack([mean_template(data.vectors[enrolment[p]]) for p in users]).astype(np.float32)
        return Gallery(users, templates)

    galleries = {-1: gallery(-1), **{f: gallery(f) for f in range(design.folds)}}
    sessions: list[PhotoSession] = []
    for person, rows in by_person.items():
        if len(rows) >= design.enrol + design.frames and person in enrolment:
            rest = [r for r in rows if r not in enrolment[person]]
            sessions += [PhotoSession(person, tuple(chunk), True, -1) for chunk in _chunks(rest, design.frames)]
        sessions += [
            PhotoSession(person, tuple(chunk), False, fold_of[person]) for chunk in _chunks(rows, design.frames)
        ]
    return SessionSet(design, galleries, sessions, enrolment)


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]


def frame_results(data: Embedded, sessions: SessionSet) -> None:
    """What the recognizer learns from each session photo against its gallery (top two users)."""
    design = sessions.design
    for g, gal in sessions.galleries.items():
        rows = sorted({r for s in sessions.sessions if s.gallery == g for r in s.rows})
        if not rows:
            continue
        scores = data.vectors[rows].astype(np.float32) @ gal.templates.T  # as the gallery computes it
        order = np.argsort(-scores, axis=1)[:, :2]
        for i, row in enumerate(rows):
            reason = "" if data.usable[row] else (data.reasons[row] or Reason.NO_FACE)
            if not reason and design.apply_pose_gate:
                reason = data.pose_reasons[row]
            if not data.usable[row]:
                sessions.frames[(g, row)] = FrameResult(sequence=0, reason=reason)
                continue
            top, second = order[i, 0], (order[i, 1] if scores.shape[1] > 1 else None)
            sessions.frames[(g, row)] = FrameResult(
                sequence=0,
                reason=reason,
                top_user=gal.users[top],
                top_score=float(scores[i, top]),
                second_score=float(scores[i, second]) if second is not None else -1.0,
                embedding=data.vectors[row].astype(float).tolist(),
            )


def session_frames(sessions: SessionSet, session: PhotoSession) -> list[FrameResult]:
    return [
        dataclasses.replace(sessions.frames[(session.gallery, row)], sequence=i) for i, row in enumerate(session.rows)
    ]


@dataclass(frozen=True)
class GridPoint:
    threshold: float
    margin: float
    k: int
    frr: Rate  # genuine sessions not approved for their person
    far: Rate  # stranger sessions approved for anyone
    wrong_user: int  # genuine sessions approved as someone else
    declines: dict[str, int]  # genuine sessions' decline reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "margin": self.margin,
            "min_agreeing_frames": self.k,
            "session_frr": self.frr.to_dict(),
            "session_far": self.far.to_dict(),
            "genuine_approved_as_someone_else": self.wrong_user,
            "genuine_decline_reasons": self.declines,
        }


def session_policy(margin: float, k: int, base: SessionPolicy | None = None) -> SessionPolicy:
    """The rule measured: the operator's policy with this margin and k, blink off (photos)."""
    return dataclasses.replace(base or SessionPolicy(), margin=margin, min_agreeing_frames=k, require_blink=False)


def evaluate(
    sessions: SessionSet,
    threshold: float,
    margin: float,
    k: int,
    base: SessionPolicy | None = None,
    confidence: float = CONFIDENCE,
) -> GridPoint:
    """Run the session rule over every session at one grid point."""
    policy = session_policy(margin, k, base)
    m = sessions.design.frames
    rejected = wrong = accepted = 0
    declines: dict[str, int] = {}
    for s in sessions.sessions:
        verdict = decide(session_frames(sessions, s), policy, threshold, expected_frames=m)
        assert verdict is not None, "a session with every frame in is always decided"
        if s.genuine:
            if not (verdict.approve and verdict.user_id == s.subject):
                rejected += 1
                declines[verdict.rule] = declines.get(verdict.rule, 0) + 1
            if verdict.approve and verdict.user_id != s.subject:
                wrong += 1
                declines["approved_as_someone_else"] = declines.get("approved_as_someone_else", 0) + 1
        elif verdict.approve:
            accepted += 1
    genuine, strangers = sessions.genuine, sessions.strangers
    return GridPoint(
        threshold,
        margin,
        k,
        Rate.of(rejected, len(genuine), len({s.subject for s in genuine}), confidence),
        Rate.of(accepted, len(strangers), len({s.subject for s in strangers}), confidence),
        wrong,
        declines,
    )


def threshold_grid(sessions: SessionSet, steps: int = 41) -> list[float]:
    """Thresholds spanning the top scores of genuine and stranger frames (rounded to 1e-4)."""
    genuine = [sessions.frames[(s.gallery, r)].top_score for s in sessions.genuine for r in s.rows]
    stranger = [sessions.frames[(s.gallery, r)].top_score for s in sessions.strangers for r in s.rows]
    genuine = [x for x in genuine if x > -1]
    stranger = [x for x in stranger if x > -1]
    lo = float(np.percentile(stranger, 50)) if stranger else float(np.min(genuine))
    hi = float(np.percentile(genuine, 50)) if genuine else float(np.max(stranger))
    if stranger:
        hi = max(hi, float(np.max(stranger)) + 1e-3)
    return sorted({round(float(t), 4) for t in np.linspace(lo, hi, steps)})


def grid_search(
    sessions: SessionSet,
    thresholds: Sequence[float],
    margins: Sequence[float] = DEFAULT_MARGINS,
    ks: Sequence[int] | None = None,
    base: SessionPolicy | None = None,
    confidence: float = CONFIDENCE,
) -> list[GridPoint]:
    ks = ks or list(range(1, sessions.design.frames + 1))
    return [evaluate(sessions, t, m, k, base, confidence) for k in ks for m in margins for t in thresholds]


def choose(points: Sequence[GridPoint]) -> GridPoint | None:
    """No stranger approved and nobody approved as someone else; then the lowest session FRR;
    ties: larger k, larger margin, then the middle threshold of what is left."""
    safe = [p for p in points if p.far.errors == 0 and p.wrong_user == 0]
    if not safe:
        return None
    best_frr = min(p.frr.errors for p in safe)
    tied = [p for p in safe if p.frr.errors == best_frr]
    top_k = max(p.k for p in tied)
    tied = [p for p in tied if p.k == top_k]
    top_margin = max(p.margin for p in tied)
    tied = sorted((p for p in tied if p.margin == top_margin), key=lambda p: p.threshold)
    return tied[(len(tied) - 1) // 2]


@dataclass
class SessionReport:
    model_id: str
    design: SessionDesign
    chosen: GridPoint | None
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "design": dataclasses.asdict(self.design),
            "chosen": self.chosen.to_dict() if self.chosen else None,
            **self.figures,
        }


def calibrate_sessions(
    data: Embedded,
    model_id: str,
    design: SessionDesign = SessionDesign(),
    margins: Sequence[float] = DEFAULT_MARGINS,
    thresholds: Sequence[float] | None = None,
    base: SessionPolicy | None = None,
    at: Sequence[tuple[float, float, int]] = (),
    confidence: float = CONFIDENCE,
) -> SessionReport:
    """Build the sessions, run the rule over the grid, choose; `at`: (threshold, margin, k)
    points reported as well (e.g. the shipped default)."""
    sessions = build_sessions(data, design)
    if not sessions.genuine or not sessions.strangers:
        raise ValueError(
            f"need genuine and stranger sessions: {len(sessions.genuine)} genuine, "
            f"{len(sessions.strangers)} stranger sessions with enrol={design.enrol}, "
            f"frames={design.frames} (people need {design.enrol + design.frames}+ photos)"
        )
    frame_results(data, sessions)
    grid = thresholds if thresholds is not None else threshold_grid(sessions)
    points = grid_search(sessions, grid, margins, None, base, confidence)
    chosen = choose(points)
    usable = data.usable & ~np.array([bool(r) and design.apply_pose_gate for r in data.pose_reasons])
    pairs = pair_scores(data.vectors, data.labels, data.usable)
    figures: dict[str, Any] = {
        "images": len(data.labels),
        "people": len(set(data.labels)),
        "images_without_usable_face": int((~data.usable).sum()),
        "images_refused_by_pose_gate": int((data.usable & ~usable).sum()),
        "gallery_size_genuine": len(sessions.galleries[-1].users),
        "gallery_size_strangers": [len(sessions.galleries[f].users) for f in range(design.folds)],
        "genuine_sessions": len(sessions.genuine),
        "genuine_people": len({s.subject for s in sessions.genuine}),
        "stranger_sessions": len(sessions.strangers),
        "stranger_people": len({s.subject for s in sessions.strangers}),
        "grid": {"thresholds": list(grid), "margins": list(margins), "k": list(range(1, design.frames + 1))},
        "meets_target": bool(chosen and chosen.frr.value <= TARGET_FRR),
        "best_per_k": [p.to_dict() for p in _best_per_k(points)],
        "at": [evaluate(sessions, t, m, k, base, confidence).to_dict() for t, m, k in at],
        "pairs_all": {
            "genuine": len(pairs.genuine),
            "impostor": len(pairs.impostor),
            "tar_at_far": [tar_at_far(pairs, t, confidence) for t in (1e-3, 1e-4)],
        },
        "notes": [
            "photos of a person stand in for the frames of a video session (harder: taken years apart)",
            "blink cannot be judged on photos: the rule runs with require_blink off",
            f"stranger sessions: each person left out of the gallery once ({design.folds} folds)",
        ],
    }
    return SessionReport(model_id, design, chosen, figures)


def _best_per_k(points: Sequence[GridPoint]) -> list[GridPoint]:
    out = []
    for k in sorted({p.k for p in points}):
        best = choose([p for p in points if p.k == k])
        if best is not None:
            out.append(best)
    return out


def render_markdown(report: SessionReport) -> str:
    f, d, c = report.figures, report.design, report.chosen
    lines = [
        f"# Session calibration of `{report.model_id}`",
        "",
        f"- {f['images']} photos of {f['people']} people; no usable face in {f['images_without_usable_face']}, "
        f"refused by the pose gate {f['images_refused_by_pose_gate']}.",
        f"- enrol {d.enrol} photos (mean template), sessions of {d.frames} photos; gallery of "
        f"{f['gallery_size_genuine']} people for {f['genuine_sessions']} genuine sessions "
        f"({f['genuine_people']} people), {d.folds} folds left out for {f['stranger_sessions']} stranger "
        f"sessions ({f['stranger_people']} people; galleries of {min(f['gallery_size_strangers'])}–"
        f"{max(f['gallery_size_strangers'])}).",
        "- The real session rule (policy.decide), require_blink off: photos cannot blink.",
        "",
    ]
    if c is None:
        lines.append("**No grid point approves no stranger.** Nothing chosen.")
    else:
        lines += [
            f"## Chosen: threshold {c.threshold:.4f}, margin {c.margin:g}, k {c.k}",
            "",
            f"- session FRR {_rate(c.frr)}",
            f"- session FAR {_rate(c.far)}",
            f"- genuine decline reasons: {c.declines or 'none'}",
            f"- target (FRR ≤ {TARGET_FRR:.0%}, no stranger approved): {'met' if f['meets_target'] else 'NOT met'}",
            "",
        ]
    lines += [
        "## Best per k",
        "",
        "| k | threshold | margin | session FRR (80 % upper) | session FAR (80 % upper) |",
        "|---|---|---|---|---|",
    ]
    for p in f["best_per_k"]:
        lines.append(_row(p))
    if f["at"]:
        lines += [
            "",
            "## At given policies",
            "",
            "| k | threshold | margin | session FRR (80 % upper) | session FAR (80 % upper) |",
            "|---|---|---|---|---|",
        ]
        lines += [_row(p) for p in f["at"]]
    pa = f["pairs_all"]
    lines += ["", f"## Pairs ({pa['genuine']:,} genuine, {pa['impostor']:,} impostor, all pairs)", ""]
    for row in pa["tar_at_far"]:
        lines.append(
            f"- TAR at FAR ≤ {row['target_far']:g}: "
            + (f"{row['tar']:.2%} (S = {row['threshold']:.4f})" if row["measurable"] else row["reason"])
        )
    lines += ["", *[f"_{n}_" for n in f["notes"]], ""]
    return "\n".join(lines)


def _rate(r: Rate) -> str:
    return f"{r.value:.2%} ({r.errors}/{r.trials}; 80 % upper {r.upper:.2%})"


def _row(p: dict[str, Any]) -> str:
    frr, far = p["session_frr"], p["session_far"]
    return (
        f"| {p['min_agreeing_frames']} | {p['threshold']:.4f} | {p['margin']:g} | "
        f"{frr['value']:.2%} = {frr['errors']}/{frr['trials']} ({frr['upper80']:.2%}) | "
        f"{far['value']:.2%} = {far['errors']}/{far['trials']} ({far['upper80']:.2%}) |"
    )


def write_report(report: SessionReport, out_dir: Path | str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))
    (out / "sessions.md").write_text(render_markdown(report))
    return {"json": str(out / "sessions.json"), "markdown": str(out / "sessions.md")}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o))
