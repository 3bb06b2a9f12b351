"""What false-accept rate a threshold gives, measured on a labelled photo set, and the
threshold chosen by it.

Definitions (the seed's): for a cosine threshold S,

- FRR(S) = genuine comparisons scoring < S / all genuine comparisons;
- FAR(S) = impostor comparisons scoring ≥ S / all impostor comparisons;

genuine = two images of one person, impostor = images of two different people, each pair
once. An image with no usable face (failure to acquire) makes all of its genuine pairs false
rejects at every threshold; its impostor pairs are left out (a face never found cannot be
accepted as someone else), and the report says how many images that was.

Every rate comes with the number of errors, comparisons and subjects it rests on, and a
one-sided 80 % Clopper–Pearson upper bound, the way FIDO judges a biometric component
(FAR ≤ 1:10,000 and FRR ≤ 3 % at the 80 % upper bound). Caveats, as in ISO/IEC 19795-1:
the all-pairs impostor comparisons are *not* independent trials (each image takes part in
N−1 of them, each person in many), so the binomial bound is optimistic; the effective sample
is closer to the number of subjects than to the number of pairs. The "rule of 3" (zero
errors in n independent trials → 95 % upper bound ≈ 3/n; 80 % → ≈ 1.61/n) therefore asks for
many more *people* than a pair count suggests before claiming a low FAR. Thresholds chosen
here should be confirmed on people not used to choose them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepay.vocabulary import Reason

log = logging.getLogger(__name__)

CONFIDENCE = 0.8  # FIDO's one-sided confidence for its FAR / FRR requirements
TAR_TARGETS = (1e-2, 1e-3, 1e-4, 1e-5)
FPIR_TARGETS = (1e-2, 1e-3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_SEED = 20240611


# ---------------------------------------------------------------- statistics


def clopper_pearson_upper(errors: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper–Pearson) upper bound on an error rate: errors of trials.

    0 errors in 16,094 trials → 1.000e-4 at 80 % (= 1 − 0.2^(1/n) ≈ 1.609 / n).
    """
    if trials <= 0:
        return 1.0
    if not 0 <= errors <= trials:
        raise ValueError(f"errors must be in 0..{trials}, got {errors}")
    if errors >= trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, errors + 1, trials - errors))


def trials_for(rate: float, confidence: float = CONFIDENCE) -> int:
    """Error-free trials needed before the upper bound reaches `rate` (80 %: ≈ 1.61 / rate)."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rate))


@dataclass(frozen=True)
class Rate:
    """An error (or success) rate with what it rests on."""

    errors: int
    trials: int
    subjects: int = 0  # distinct people behind the trials
    upper: float = 1.0  # one-sided CONFIDENCE Clopper–Pearson upper bound on errors/trials

    @property
    def value(self) -> float:
        return self.errors / self.trials if self.trials else float("nan")

    @classmethod
    def of(cls, errors: int, trials: int, subjects: int = 0, confidence: float = CONFIDENCE) -> Rate:
        return cls(int(errors), int(trials), int(subjects), clopper_pearson_upper(int(errors), int(trials), confidence))

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _num(self.value),
            "errors": self.errors,
            "trials": self.trials,
            "subjects": self.subjects,
            "upper80": _num(self.upper),
        }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def far_frr(genuine: np.ndarray, impostor: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """FAR(S) = share of impostor ≥ S, FRR(S) = share of genuine < S, for each S."""
    s = np.asarray(thresholds, dtype=np.float64)
    g, i = np.sort(np.asarray(genuine, np.float64)), np.sort(np.asarray(impostor, np.float64))
    frr = np.searchsorted(g, s, side="left") / max(len(g), 1)
    far = (len(i) - np.searchsorted(i, s, side="left")) / max(len(i), 1)
    return far, frr


def false_accepts(impostor_sorted: np.ndarray, threshold: float) -> int:
    return int(len(impostor_sorted) - np.searchsorted(impostor_sorted, threshold, side="left"))


def false_rejects(genuine_sorted: np.ndarray, threshold: float) -> int:
    return int(np.searchsorted(genuine_sorted, threshold, side="left"))


def eer(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(EER, its threshold): at the candidate threshold where FAR and FRR are closest, their mean.

    Candidates are every observed score and one above the highest, so on a finite set the
    result is exact (ties: the threshold with the lower max(FAR, FRR), then the lower S).
    """
    both = np.concatenate([np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)])
    cands = np.unique(both[np.isfinite(both)])
    if not len(cands):
        return float("nan"), float("nan")
    cands = np.append(cands, np.nextafter(cands.max(), np.inf))
    far, frr = far_frr(genuine, impostor, cands)
    order = np.lexsort((cands, np.maximum(far, frr), np.abs(far - frr)))
    k = order[0]
    return float((far[k] + frr[k]) / 2), float(cands[k])


def _above(score: float) -> float:
    """The smallest float32 above a score: a threshold just excluding it, also in float32 maths."""
    return float(np.nextafter(np.float32(score), np.float32(np.inf)))


def threshold_for_errors(impostor_sorted: np.ndarray, k: int) -> float:
    """Smallest S (float32-exact) with at most k of the sorted impostor scores ≥ S."""
    n = len(impostor_sorted)
    if k >= n:
        return -1.0  # the lowest cosine: every impostor may pass
    return _above(impostor_sorted[n - 1 - k])


def max_errors_within(trials: int, target: float, confidence: float = CONFIDENCE) -> int | None:
    """The most errors whose upper bound is still ≤ target (None: not even zero errors is)."""
    if trials <= 0 or clopper_pearson_upper(0, trials, confidence) > target:
        return None
    lo, hi = 0, trials  # lo passes; find the largest passing k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if clopper_pearson_upper(mid, trials, confidence) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def not_measurable(n_impostor: int, target: float) -> str | None:
    """The reason a FAR target cannot be measured with this many impostor pairs, or None."""
    if n_impostor <= 0 or 1.0 / n_impostor > target:
        return f"not measurable: only {n_impostor} impostor pairs (1/{n_impostor} > {target:g})"
    return None


@dataclass(frozen=True)
class ScoreSet:
    """Genuine and impostor scores with the subjects behind them."""

    genuine: np.ndarray  # float64; −inf for pairs with an image without a usable face
    impostor: np.ndarray  # float64
    genuine_subjects: int
    impostor_subjects: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "genuine", np.sort(np.asarray(self.genuine, np.float64)))
        object.__setattr__(self, "impostor", np.sort(np.asarray(self.impostor, np.float64)))

    def far(self, threshold: float, confidence: float = CONFIDENCE) -> Rate:
        return Rate.of(false_accepts(self.impostor, threshold), len(self.impostor), self.impostor_subjects, confidence)

    def frr(self, threshold: float, confidence: float = CONFIDENCE) -> Rate:
        return Rate.of(false_rejects(self.genuine, threshold), len(self.genuine), self.genuine_subjects, confidence)


def tar_at_far(scores: ScoreSet, target: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """TAR at the smallest S whose measured FAR ≤ target, or why it cannot be measured."""
    reason = not_measurable(len(scores.impostor), target)
    if reason:
        return {"target_far": target, "measurable": False, "reason": reason}
    k = math.floor(target * len(scores.impostor) + 1e-9)
    s = threshold_for_errors(scores.impostor, k)
    far, frr = scores.far(s, confidence), scores.frr(s, confidence)
    return {
        "target_far": target,
        "measurable": True,
        "threshold": s,
        "tar": _num(1 - frr.value),
        "far": far.to_dict(),
        "frr": frr.to_dict(),
        "far_upper_within_target": far.upper <= target,
    }


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    target_far: float  # what was asked
    effective_target_far: float  # what was achieved: target, or the lowest measurable
    basis: str  # "upper_bound" | "point_estimate" | "lowest_measurable"
    far: Rate
    frr: Rate
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "target_far": self.target_far,
            "effective_target_far": self.effective_target_far,
            "basis": self.basis,
            "far": self.far.to_dict(),
            "frr": self.frr.to_dict(),
            "tar": _num(1 - self.frr.value),
            "note": self.note,
        }


def choose_threshold(scores: ScoreSet, target_far: float = 1e-5, confidence: float = CONFIDENCE) -> ThresholdChoice:
    """The smallest threshold whose FAR *upper bound* is ≤ target_far, where the pairs allow.

    Else (too few impostor pairs for the bound) the smallest whose measured FAR ≤ target_far;
    else (not even that: 1/N > target) the lowest measurable: just above the highest impostor
    score, whose FAR is 0 of N with upper bound ≈ 1.61 / N at 80 %.
    """
    imp, n = scores.impostor, len(scores.impostor)
    k = max_errors_within(n, target_far, confidence)
    if k is not None:
        basis, effective = "upper_bound", target_far
        note = (
            f"smallest S whose {confidence:.0%} upper bound on FAR is <= {target_far:g} "
            f"(at most {k} of {n} impostor pairs at or above it)"
        )
    elif not not_measurable(n, target_far):
        k = math.floor(target_far * n + 1e-9)
        basis, effective = "point_estimate", target_far
        note = (
            f"{n} impostor pairs cannot bound FAR at {target_far:g} with {confidence:.0%} confidence "
            f"(needs >= {trials_for(target_far, confidence)} error-free pairs): smallest S whose measured "
            f"FAR <= {target_far:g}"
        )
    else:
        k = 0
        basis, effective = "lowest_measurable", (1.0 / n if n else 1.0)
        note = (
            f"{not_measurable(n, target_far)}; chose the lowest measurable: just above the highest impostor "
            f"score (FAR 0/{n}, {confidence:.0%} upper bound {clopper_pearson_upper(0, n, confidence):.2e})"
        )
    s = threshold_for_errors(imp, k)
    return ThresholdChoice(s, target_far, effective, basis, scores.far(s, confidence), scores.frr(s, confidence), note)


# ---------------------------------------------------------------- scores from embeddings


def pair_scores(embeddings: np.ndarray, labels: Sequence[str], usable: np.ndarray | None = None) -> ScoreSet:
    """All genuine and all cross-identity pairs (each unordered pair once) from one N×N matrix.

    Rows of `embeddings` must be L2-normalised (cosine = dot product); rows where `usable` is
    False (no face) are failures: their genuine pairs score −inf, their impostor pairs are dropped.
    """
    labels_arr = np.asarray(labels)
    n = len(labels_arr)
    usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
    x = np.asarray(embeddings, np.float32)
    sims = x @ x.T  # float32, as the gallery computes it
    iu, ju = np.triu_indices(n, k=1)
    same = labels_arr[iu] == labels_arr[ju]
    both = usable[iu] & usable[ju]
    genuine = np.where(both[same], sims[iu[same], ju[same]], -np.inf)
    imp_mask = ~same & both
    impostor = sims[iu[imp_mask], ju[imp_mask]]
    _ids, counts = np.unique(labels_arr, return_counts=True)
    usable_ids = np.unique(labels_arr[usable])
    return ScoreSet(
        genuine.astype(np.float64),
        impostor.astype(np.float64),
        genuine_subjects=int((counts >= 2).sum()),
        impostor_subjects=len(usable_ids) if len(usable_ids) >= 2 else 0,
    )


def identification(
    embeddings: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    names: Sequence[str],
    usable: np.ndarray,
    enrolled_ids: set[str] | None = None,
    thresholds: dict[str, float] | None = None,
    fpir_targets: Sequence[float] = FPIR_TARGETS,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """1:N with one enrolled image per identity: its first usable image by name.

    Mated probes: the other images of enrolled identities (a probe without a usable face is a
    miss). Non-mated probes: the usable images of identities not enrolled (`enrolled_ids` None:
    every identity is enrolled, a closed set). Rank-1 = the top gallery score is the probe's
    own identity; FPIR(T) = non-mated probes whose top score ≥ T; FNIR(T) = mated probes not
    returned at rank 1 with a score ≥ T; each of `thresholds` gets those figures.
    """
    labels_arr, usable = np.asarray(labels), np.asarray(usable, bool)
    wanted = set(labels_arr.tolist()) if enrolled_ids is None else set(enrolled_ids)
    gallery: dict[str, int] = {}
    for i in np.lexsort((np.asarray(names), labels_arr)):
        if usable[i] and labels_arr[i] in wanted and labels_arr[i] not in gallery:
            gallery[str(labels_arr[i])] = int(i)
    g_labels, g_rows = np.array(list(gallery)), np.array(list(gallery.values()), dtype=int)
    rows = np.arange(len(labels_arr))
    mated = rows[np.isin(labels_arr, g_labels) & ~np.isin(rows, g_rows)]
    strangers = rows[~np.isin(labels_arr, list(wanted))]
    nonmated = strangers[usable[strangers]]
    x = np.asarray(embeddings, np.float32)

    def top(probe_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(probe_rows) == 0 or len(g_rows) == 0:
            return np.array([], dtype=str), np.array([], dtype=np.float64)
        s = x[probe_rows] @ x[g_rows].T
        best = s.argmax(axis=1)
        return g_labels[best], s[np.arange(len(probe_rows)), best].astype(np.float64)

    m_top, m_score = top(mated)
    hit = usable[mated] & (m_top == labels_arr[mated]) if len(mated) else np.zeros(0, bool)
    m_score = np.where(hit, m_score, -np.inf) if len(mated) else m_score  # a miss never counts as found
    n_sorted = np.sort(top(nonmated)[1])
    subj_m, subj_n = len(set(labels_arr[mated].tolist())), len(set(labels_arr[nonmated].tolist()))
    miss = Rate.of(int((~hit).sum()), len(mated), subj_m, confidence)

    def at(t: float) -> dict[str, Any]:
        fnir = Rate.of(int((m_score < t).sum()), len(mated), subj_m, confidence)
        fpir = Rate.of(false_accepts(n_sorted, t), len(nonmated), subj_n, confidence)
        return {
            "threshold": t,
            "fnir": fnir.to_dict(),
            "fpir": fpir.to_dict(),
            "rank1_within_threshold": _num(1 - fnir.value),
        }

    out: dict[str, Any] = {
        "gallery_size": len(g_rows),
        "not_enrolled_no_usable_face": sorted(wanted - set(gallery)),
        "mated_probes": len(mated),
        "mated_probes_without_face": int((~usable[mated]).sum()),
        "non_mated_probes": len(nonmated),
        "non_mated_probes_without_face": int(len(strangers) - len(nonmated)),
        "rank1": {
            "value": _num(1 - miss.value),
            "hits": miss.trials - miss.errors,
            "trials": miss.trials,
            "subjects": subj_m,
            "miss_upper80": _num(miss.upper),
        },
    }
    if thresholds:
        out["at_thresholds"] = {name: at(t) for name, t in thresholds.items()}
    if enrolled_ids is not None:
        out["fnir_at_fpir"] = []
        for target in fpir_targets:
            reason = not_measurable(len(nonmated), target)
            if reason:
                out["fnir_at_fpir"].append(
                    {
                        "target_fpir": target,
                        "measurable": False,
                        "reason": reason.replace("impostor pairs", "non-mated probes"),
                    }
                )
            else:
                t = threshold_for_errors(n_sorted, math.floor(target * len(nonmated) + 1e-9))
                out["fnir_at_fpir"].append({"target_fpir": target, "measurable": True, **at(t)})
    return out


def pairs_file_figures(
    pairs: list[tuple[int | None, int | None, bool]],
    embeddings: np.ndarray,
    thresholds: dict[str, float],
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Figures on a fixed pairs list (LFW-style pairs.csv), comparable with others' reports.

    Accuracy counts a pair with an image without a usable face as a wrong answer, same person
    or not. FAR/FRR/TAR keep every pair in the denominator: such a pair is a reject (a false
    reject when same, a correct reject when different).
    """
    x = np.asarray(embeddings, np.float32)
    same = np.array([p[2] for p in pairs], bool)
    ok = np.array([a is not None and b is not None for a, b, _ in pairs], bool)
    score = np.full(len(pairs), -np.inf)
    idx = np.array([(a, b) for a, b, _ in pairs if a is not None and b is not None], dtype=int).reshape(-1, 2)
    score[ok] = np.einsum("ij,ij->i", x[idx[:, 0]], x[idx[:, 1]])
    sc = ScoreSet(score[same], score[~same], 0, 0)
    g_ok, i_ok = np.sort(score[same & ok]), np.sort(score[~same & ok])

    def correct(t) -> np.ndarray:  # pairs answered right at each threshold t
        t = np.asarray(t, np.float64)
        return (len(g_ok) - np.searchsorted(g_ok, t, side="left")) + np.searchsorted(i_ok, t, side="left")

    cands = np.unique(np.concatenate([g_ok, i_ok, [1.0]]))
    cands = np.append(cands, np.nextafter(cands.max(), np.inf))
    acc = correct(cands) / len(pairs)
    best = int(acc.argmax())
    out: dict[str, Any] = {
        "pairs_same": int(same.sum()),
        "pairs_different": int((~same).sum()),
        "pairs_with_unusable_image": int((~ok).sum()),
        "best_accuracy": float(acc[best]),
        "best_accuracy_threshold": float(cands[best]),
        "at": {
            name: {
                "threshold": t,
                "accuracy": float(correct(t) / len(pairs)),
                "far": sc.far(t, confidence).to_dict(),
                "frr": sc.frr(t, confidence).to_dict(),
            }
            for name, t in thresholds.items()
        },
        "tar_at_far": [tar_at_far(sc, t, confidence) for t in (1e-2, 1e-3)],
    }
    t0 = threshold_for_errors(sc.impostor, 0)
    out["tar_at_far_zero"] = {
        "threshold": t0,
        "tar": _num(1 - sc.frr(t0, confidence).value),
        "far": sc.far(t0, confidence).to_dict(),
    }
    return out


# ---------------------------------------------------------------- the data set


def labelled_images(data_dir: Path) -> list[tuple[Path, str]]:
    """(path, identity) of each identity image, sorted: MANIFEST.csv if there is one (rows of
    kind "identity" when it has a kind column), else `identities/<person>/*` or `<person>/*`."""
    data_dir = Path(data_dir)
    manifest = data_dir / "MANIFEST.csv"
    if manifest.exists():
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and {"path", "identity"} <= set(rows[0]):
            items = [
                (data_dir / r["path"], r["identity"])
                for r in rows
                if r.get("kind", "identity") in ("identity", None, "") and r["identity"]
            ]
            return sorted(items, key=lambda t: (t[1], str(t[0])))
    root = data_dir / "identities" if (data_dir / "identities").is_dir() else data_dir
    items = [
        (p, d.name)
        for d in sorted(root.iterdir())
        if d.is_dir()
        for p in sorted(d.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(items, key=lambda t: (t[1], str(t[0])))


def read_pairs(data_dir: Path, index: dict[Path, int]) -> list[tuple[int | None, int | None, bool]] | None:
    """pairs.csv (img1,img2,same) as row indices into the embeddings; None without the file."""
    path = Path(data_dir) / "pairs.csv"
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        return [
            (
                index.get((Path(data_dir) / r["img1"]).resolve()),
                index.get((Path(data_dir) / r["img2"]).resolve()),
                r["same"].strip() in ("1", "true", "True"),
            )
            for r in csv.DictReader(fh)
        ]


@dataclass
class Embedded:
    """The data set after the models: one row per image; unusable rows are zero vectors."""

    paths: list[Path]
    labels: list[str]
    vectors: np.ndarray
    usable: np.ndarray
    reasons: list[str]  # "" for usable, else the rejection reason
    pose_reasons: list[str]
    face_px: np.ndarray
    sharpness: np.ndarray
    seconds: float
    setup: str = ""  # the embedder's models and options: a cache is reused only for the same
    most_central: np.ndarray | None = None  # labelled mode took the most central of several faces

    def save(self, path: Path) -> None:
        # most_central only when there is one: None would be stored as a pickled object, which load refuses.
        arrays: dict[str, Any] = dict(
            paths=np.array([str(p) for p in self.paths]),
            labels=np.array(self.labels),
            vectors=self.vectors,
            usable=self.usable,
            reasons=np.array(self.reasons),
            pose_reasons=np.array(self.pose_reasons),
            face_px=self.face_px,
            sharpness=self.sharpness,
            seconds=self.seconds,
            setup=self.setup,
        )
        if self.most_central is not None:
            arrays["most_central"] = self.most_central
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> Embedded:
        z = np.load(path, allow_pickle=False)
        return cls(
            [Path(p) for p in z["paths"]],
            [str(x) for x in z["labels"]],
            z["vectors"],
            z["usable"],
            [str(x) for x in z["reasons"]],
            [str(x) for x in z["pose_reasons"]],
            z["face_px"],
            z["sharpness"],
            float(z["seconds"]),
            str(z["setup"]),
            z["most_central"] if "most_central" in z.files else None,
        )


def embed_dataset(
    items: list[tuple[Path, str]], embedder, batch: int = 32, progress: Callable[[int, int], None] | None = None
) -> Embedded:
    """Run `embedder.embed_images` over the files in batches (an unreadable file is a failure)."""
    from facepay.app.offline import Rejected
    from facepay.images import ImageError, decode_image

    settings = embedder.settings
    results: list[Any] = []
    start = time.perf_counter()
    for b in range(0, len(items), batch):
        chunk: list[Any] = []
        for path, _ in items[b : b + batch]:
            try:
                chunk.append(decode_image(Path(path).read_bytes(), settings.max_image_bytes, settings.max_image_pixels))
            except (ImageError, OSError) as exc:
                chunk.append(Rejected(Reason.UNREADABLE_IMAGE, str(exc)))
        readable = iter(embedder.embed_images([c for c in chunk if isinstance(c, np.ndarray)]))
        results += [next(readable) if isinstance(c, np.ndarray) else c for c in chunk]
        if progress:
            progress(len(results), len(items))
    seconds = time.perf_counter() - start
    ok = np.array([not isinstance(r, Rejected) for r in results], bool)
    dim = next((len(r.embedding) for r, good in zip(results, ok, strict=True) if good), 1)
    vectors = np.zeros((len(results), dim), np.float32)
    for k in np.flatnonzero(ok):
        vectors[k] = results[k].embedding
    return Embedded(
        paths=[p for p, _ in items],
        labels=[lab for _, lab in items],
        vectors=vectors,
        usable=ok,
        reasons=[r.reason if isinstance(r, Rejected) else "" for r in results],
        pose_reasons=["" if isinstance(r, Rejected) else r.pose_reason for r in results],
        face_px=np.array([np.nan if isinstance(r, Rejected) else r.face_px for r in results]),
        sharpness=np.array([np.nan if isinstance(r, Rejected) else r.sharpness for r in results]),
        seconds=seconds,
        setup=getattr(embedder, "setup", ""),
        most_central=np.array([bool(getattr(r, "most_central", False)) for r in results]),
    )


def embedded_dataset(
    data_dir: Path | str, embedder, cache: Path | str | None = None, progress: Callable[[int, int], None] | None = None
) -> Embedded:
    """The labelled images of `data_dir` through `embedder`; `cache` (.npz) is reused when it
    holds the same files and the same setup (models and options), else (re)written."""
    data_dir = Path(data_dir)
    items = labelled_images(data_dir)
    if len({lab for _, lab in items}) < 2:
        raise ValueError(f"need labelled images of at least two people under {data_dir}, found {len(items)} images")
    if cache is not None and Path(cache).exists():
        data = Embedded.load(Path(cache))
        same_files = [p.resolve() for p in data.paths] == [p.resolve() for p, _ in items]
        if same_files and data.setup == getattr(embedder, "setup", ""):
            return data
        log.info("embedding cache %s is for other files or another model: recomputing", cache)
    data = embed_dataset(items, embedder, progress=progress)
    if cache is not None:
        data.save(Path(cache))
    return data


# ---------------------------------------------------------------- the report


@dataclass
class CalibrationReport:
    model_id: str
    threshold: float  # the chosen cosine threshold for `target_far`
    target_far: float
    figures: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "threshold": self.threshold,
            "target_far": self.target_far,
            **self.figures,
            "files": self.files,
        }


def calibrate(
    data_dir: Path | str,
    out_dir: Path | str,
    target_far: float = 1e-5,
    embedder=None,
    *,
    confidence: float = CONFIDENCE,
    seed: int = SPLIT_SEED,
    apply_pose_gate: bool = False,
    default_threshold: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache: Path | str | None = None,
) -> CalibrationReport:
    """Embed every identity image of `data_dir`, measure, choose the threshold, write the report.

    `embedder`: a `facepay.app.offline.FaceEmbedder`; when None, one is built from the environment's
    settings in labelled mode (where the payer rule refuses a photo with two alike faces, the
    labelled person is taken to be the most central one; the report counts those photos).
    With `apply_pose_gate` faces the pose stage would not identify count as failures.
    Writes report.json, report.md, det.png and roc.png into `out_dir`. `cache`: an .npz of the
    embeddings, reused when it holds the same files and model id (to re-run with another
    target in seconds), else written; it holds biometric templates: keep it private.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if embedder is None:
        from facepay.app.offline import FaceEmbedder
        from facepay.config import load_settings

        embedder = FaceEmbedder(load_settings(), labelled=True)
    data = embedded_dataset(data_dir, embedder, cache, progress)
    items = list(zip(data.paths, data.labels, strict=True))
    usable = data.usable.copy()
    if apply_pose_gate:
        usable &= np.array([not r for r in data.pose_reasons])
    labels = np.asarray(data.labels)
    names = [p.name for p in data.paths]
    n_ids = len(set(data.labels))

    scores = pair_scores(data.vectors, data.labels, usable)
    if not len(scores.impostor):
        raise ValueError("no impostor pairs with usable faces: cannot measure a false-accept rate")
    choice = choose_threshold(scores, target_far, confidence)
    eer_value, eer_t = eer(scores.genuine, scores.impostor)
    model_id = getattr(embedder, "model_id", "unknown")
    if default_threshold is None:
        default_threshold = getattr(getattr(embedder, "embedder", None), "default_threshold", None)

    failures: dict[str, int] = {}
    for r in data.reasons:
        if r:
            failures[r] = failures.get(r, 0) + 1
    pose_failures: dict[str, int] = {}
    for ok, r in zip(data.usable, data.pose_reasons, strict=True):
        if ok and r:
            pose_failures[r] = pose_failures.get(r, 0) + 1

    ids = sorted(set(data.labels))
    rng = np.random.default_rng(seed)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    enrolled = set(shuffled[: (len(ids) + 1) // 2])

    thresholds = {"chosen": choice.threshold}
    if default_threshold is not None:
        thresholds["model_default"] = float(default_threshold)
    figures: dict[str, Any] = {
        "data_dir": str(data_dir),
        "models": getattr(embedder, "model_ids", {"recognizer": model_id}),
        "confidence": confidence,
        "images": len(items),
        "subjects": n_ids,
        "subjects_with_2plus_images": int(sum(1 for i in ids if data.labels.count(i) >= 2)),
        "images_without_usable_face": int((~data.usable).sum()),
        "failure_reasons": failures,
        "labelled_mode": bool(getattr(embedder, "labelled", False)),
        "most_central_face_taken": int(np.sum(data.most_central)) if data.most_central is not None else 0,
        "pose_gate_applied": apply_pose_gate,
        "usable_faces_failing_pose_gate": pose_failures,
        "embedding_seconds": round(data.seconds, 1),
        "seconds_per_image": round(data.seconds / len(items), 4),
        "genuine_pairs": len(scores.genuine),
        "genuine_subjects": scores.genuine_subjects,
        "impostor_pairs": len(scores.impostor),
        "impostor_subjects": scores.impostor_subjects,
        "genuine_pairs_failed_to_acquire": int(np.isneginf(scores.genuine).sum()),
        "score_range": {"genuine": _range(scores.genuine), "impostor": _range(scores.impostor)},
        "eer": {"value": eer_value, "threshold": eer_t},
        "chosen": choice.to_dict(),
        "tar_at_far": [tar_at_far(scores, t, confidence) for t in TAR_TARGETS],
        "at_thresholds": {
            k: {"threshold": t, "far": scores.far(t, confidence).to_dict(), "frr": scores.frr(t, confidence).to_dict()}
            for k, t in thresholds.items()
        },
        "identification_closed_set": identification(
            data.vectors, labels, names, usable, None, thresholds, confidence=confidence
        ),
        "identification_open_set": {
            "seed": seed,
            "enrolled_identities": len(enrolled),
            "non_enrolled_identities": len(ids) - len(enrolled),
            **identification(data.vectors, labels, names, usable, enrolled, thresholds, confidence=confidence),
        },
        "caveat": (
            "All-pairs comparisons share images and people, so they are not independent trials: "
            "the Clopper-Pearson bounds are optimistic (ISO/IEC 19795-1; FIDO bounds at 80 %). "
            "Confirm on people not used to choose the threshold."
        ),
    }
    index = {p.resolve(): i for i, p in enumerate(data.paths) if usable[i]}
    pairs = read_pairs(data_dir, index)
    if pairs:
        figures["pairs_csv"] = pairs_file_figures(pairs, data.vectors, thresholds, confidence)

    report = CalibrationReport(model_id=model_id, threshold=choice.threshold, target_far=target_far, figures=figures)
    report.files = {
        "json": str(out_dir / "report.json"),
        "markdown": str(out_dir / "report.md"),
        **plot_curves(scores, choice, eer_t, out_dir),
    }
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _range(x: np.ndarray) -> dict[str, float | None]:
    f = x[np.isfinite(x)]
    if not len(f):
        return {"min": None, "median": None, "max": None}
    return {"min": float(f.min()), "median": float(np.median(f)), "max": float(f.max())}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def plot_curves(scores: ScoreSet, choice: ThresholdChoice, eer_threshold: float, out_dir: Path) -> dict[str, str]:
    """det.png (FAR vs FRR, log–log) and roc.png (TAR vs FAR, log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, i = scores.genuine, scores.impostor
    top_imp = i[-20000:] if len(i) else i
    finite = np.concatenate([g[np.isfinite(g)], top_imp, np.linspace(-1, 1, 2001)])
    ts = np.unique(finite)
    far, frr = far_frr(g, i, ts)
    floor_far = 0.5 / max(len(i), 1)
    floor_frr = 0.5 / max(len(g), 1)
    n_info = f"{len(g):,} genuine / {len(i):,} impostor pairs, {scores.impostor_subjects} subjects"
    c_far, c_frr = choice.far.value, choice.frr.value
    e_far, e_frr = far_frr(g, i, [eer_threshold])

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(np.maximum(far, floor_far), np.maximum(frr, floor_frr), lw=1.5)
    ax.plot(
        [max(c_far, floor_far)],
        [max(c_frr, floor_frr)],
        "o",
        color="C3",
        label=f"chosen S={choice.threshold:.4f} ({choice.basis})",
    )
    ax.plot([max(e_far[0], floor_far)], [max(e_frr[0], floor_frr)], "s", color="C2", label=f"EER S={eer_threshold:.4f}")
    ax.axvline(choice.far.upper, color="C3", ls=":", lw=1, label=f"FAR 80% upper bound {choice.far.upper:.1e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FAR (false accept rate; 0 drawn at 0.5/N)")
    ax.set_ylabel("FRR (false reject rate)")
    ax.set_title(f"DET\n{n_info}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "det.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(np.maximum(far, floor_far), 1 - frr, lw=1.5)
    ax.plot([max(c_far, floor_far)], [1 - c_frr], "o", color="C3", label=f"chosen S={choice.threshold:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("FAR (false accept rate; 0 drawn at 0.5/N)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(f"ROC\n{n_info}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    return {"det": str(out_dir / "det.png"), "roc": str(out_dir / "roc.png")}


def _pct(rate: dict[str, Any]) -> str:
    v, u = rate.get("value"), rate.get("upper80")
    val = "n/a" if v is None else f"{v:.3%}"
    up = "" if u is None else f" (80 % upper {u:.2e})"
    return f"{val}{up} = {rate['errors']}/{rate['trials']:,}, {rate['subjects']} subjects"


def render_markdown(report: CalibrationReport) -> str:
    f = report.figures
    c = f["chosen"]
    lines = [
        f"# Calibration of `{report.model_id}` on `{f['data_dir']}`",
        "",
        f"- {f['images']} images of {f['subjects']} people ({f['subjects_with_2plus_images']} with 2+ images); "
        f"no usable face in {f['images_without_usable_face']} ({f['failure_reasons'] or 'none'}); "
        f"most central of several alike faces taken in {f['most_central_face_taken']} (labelled mode: "
        f"{f['labelled_mode']}); "
        f"pose gate applied: {f['pose_gate_applied']} (would fail: {f['usable_faces_failing_pose_gate'] or 'none'}).",
        f"- {f['genuine_pairs']:,} genuine pairs ({f['genuine_subjects']} subjects; "
        f"{f['genuine_pairs_failed_to_acquire']} with a failed image, counted as false rejects), "
        f"{f['impostor_pairs']:,} impostor pairs ({f['impostor_subjects']} subjects).",
        f"- EER {f['eer']['value']:.3%} at S = {f['eer']['threshold']:.4f}.",
        "",
        f"## Threshold for FAR ≤ {report.target_far:g}: **S = {report.threshold:.6f}** ({c['basis']})",
        "",
        f"{c['note']}.",
        "",
        f"- FAR {_pct(c['far'])}",
        f"- FRR {_pct(c['frr'])}",
        "",
        "## TAR at FAR",
        "",
        "| target FAR | threshold | TAR | FAR measured (80 % upper) |",
        "|---|---|---|---|",
    ]
    for row in f["tar_at_far"]:
        if row["measurable"]:
            lines.append(
                f"| {row['target_far']:g} | {row['threshold']:.4f} | {row['tar']:.2%} | "
                f"{row['far']['value']:.2e} ({row['far']['upper80']:.2e}) |"
            )
        else:
            lines.append(f"| {row['target_far']:g} | – | – | {row['reason']} |")
    for key, title in (
        ("identification_closed_set", "1:N, every identity enrolled (closed set)"),
        ("identification_open_set", "1:N open set (half the identities enrolled, seeded)"),
    ):
        ident = f[key]
        lines += [
            "",
            f"## {title}",
            "",
            f"- gallery {ident['gallery_size']}, {ident['mated_probes']} mated probes, "
            f"{ident['non_mated_probes']} non-mated probes",
            f"- rank-1 {ident['rank1']['value']:.2%} ({ident['rank1']['hits']}/{ident['rank1']['trials']})",
        ]
        for name, a in ident.get("at_thresholds", {}).items():
            fpir = f", FPIR {_pct(a['fpir'])}" if ident["non_mated_probes"] else ""
            lines.append(
                f"- {name} S = {a['threshold']:.4f}: rank-1 within threshold {a['rank1_within_threshold']:.2%}{fpir}"
            )
        for row in ident.get("fnir_at_fpir", []):
            if row["measurable"]:
                lines.append(
                    f"- FNIR at FPIR {row['target_fpir']:g}: {row['fnir']['value']:.2%} (S = {row['threshold']:.4f})"
                )
            else:
                lines.append(f"- FNIR at FPIR {row['target_fpir']:g}: {row['reason']}")
    if "pairs_csv" in f:
        p = f["pairs_csv"]
        lines += [
            "",
            "## pairs.csv",
            "",
            f"- {p['pairs_same']} same / {p['pairs_different']} different; best accuracy "
            f"{p['best_accuracy']:.2%} at S = {p['best_accuracy_threshold']:.4f}",
        ]
        for name, a in p["at"].items():
            lines.append(
                f"- {name} S = {a['threshold']:.4f}: accuracy {a['accuracy']:.2%}, "
                f"FAR {a['far']['value']:.2%}, FRR {a['frr']['value']:.2%}"
            )
        for row in p["tar_at_far"]:
            lines.append(
                f"- TAR at FAR ≤ {row['target_far']:g}: "
                + (f"{row['tar']:.2%}" if row["measurable"] else row["reason"])
            )
        lines.append(f"- TAR at FAR 0: {p['tar_at_far_zero']['tar']:.2%}")
    lines += [
        "",
        f"Embedding: {f['embedding_seconds']} s, {f['seconds_per_image'] * 1000:.0f} ms per image "
        "(detector + landmarks + pose + embedder).",
        "",
        f"_{f['caveat']}_",
        "",
    ]
    return "\n".join(lines)
