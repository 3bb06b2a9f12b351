"""Session calibration: the real session rule over enrolled, genuine and stranger photo sessions,
a grid of threshold × margin × k, the policy chosen and stored per template space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from facepay import keys, thresholds
from facepay.app.calibration import Embedded, clopper_pearson_upper
from facepay.app.session_calibration import (
    SessionDesign,
    build_sessions,
    calibrate_sessions,
    evaluate,
    frame_results,
)
from facepay.config import SessionPolicy, Settings
from facepay.runtime.embedded import EmbeddedValkey

DIM = 16


def toy_set(twin_cosine: float = 0.8, failed_photo: bool = False) -> Embedded:
    """4 people with 6 photos (cosine ~0.95 to their own direction), 4 strangers with 3 photos,
    one of them a look-alike of person p0 (cosine `twin_cosine` to p0's direction)."""
    rng = np.random.default_rng(1)
    rows, labels = [], []

    def photo(direction: np.ndarray, spread: float = 0.3) -> np.ndarray:
        noise = rng.normal(size=DIM)
        noise -= noise @ direction * direction
        v = direction + spread * noise / np.linalg.norm(noise)
        return v / np.linalg.norm(v)

    axes = np.eye(DIM)
    for i in range(4):
        rows += [photo(axes[i]) for _ in range(6)]
        labels += [f"p{i}"] * 6
    for i in range(4, 7):
        rows += [photo(axes[i]) for _ in range(3)]
        labels += [f"s{i}"] * 3
    twin = twin_cosine * axes[0] + np.sqrt(1 - twin_cosine**2) * axes[7]
    rows += [photo(twin, 0.05) for _ in range(3)]
    labels += ["twin"] * 3
    n = len(rows)
    usable = np.ones(n, bool)
    if failed_photo:
        usable[5] = False  # p0's last photo: in its genuine session
    vectors = np.where(usable[:, None], np.array(rows, np.float32), 0).astype(np.float32)
    return Embedded(
        [Path(f"{lab}/{i:02d}.jpg") for i, lab in enumerate(labels)],
        labels,
        vectors,
        usable,
        ["" if u else "no_face" for u in usable],
        [""] * n,
        np.full(n, 100.0),
        np.full(n, 50.0),
        0.0,
    )


def test_sessions_are_built_from_other_photos_and_strangers_are_never_in_their_gallery():
    data = toy_set()
    sessions = build_sessions(data, SessionDesign(enrol=3, frames=3, folds=8))
    assert len(sessions.genuine) == 4, "each 6-photo person: 3 enrolled, one session of the other 3"
    assert len(sessions.strangers) == 4 * 2 + 4, "every person once a stranger, in sessions of 3 photos"
    for s in sessions.genuine:
        assert not set(s.rows) & set(sessions.enrolment_rows[s.subject])
        assert s.subject in sessions.galleries[-1].users
    for s in sessions.strangers:
        assert s.subject not in sessions.galleries[s.gallery].users
    assert len(sessions.galleries[-1].users) == 8


def test_the_rule_is_the_pipeline_s_rule_at_each_grid_point():
    data = toy_set(twin_cosine=0.8)
    sessions = build_sessions(data, SessionDesign(enrol=3, frames=3, folds=8))
    frame_results(data, sessions)
    low = evaluate(sessions, threshold=0.5, margin=0.0, k=3)
    assert low.far.errors >= 1, "the look-alike passes a low threshold as p0"
    assert low.frr.errors == 0
    right = evaluate(sessions, threshold=0.88, margin=0.0, k=3)
    assert (right.far.errors, right.frr.errors, right.wrong_user) == (0, 0, 0)
    assert right.far.upper == pytest.approx(clopper_pearson_upper(0, 12)) == pytest.approx(1 - 0.2 ** (1 / 12))
    too_high = evaluate(sessions, threshold=0.999, margin=0.0, k=3)
    assert too_high.frr.errors == 4 and too_high.declines == {"unknown_face": 4}


def test_a_frame_without_a_face_counts_against_k():
    data = toy_set(failed_photo=True)
    sessions = build_sessions(data, SessionDesign(enrol=3, frames=3, folds=8))
    frame_results(data, sessions)
    assert evaluate(sessions, 0.88, 0.0, k=3).declines == {"too_few_frames": 1}
    assert evaluate(sessions, 0.88, 0.0, k=2).frr.errors == 0


def test_the_chosen_policy_approves_no_stranger_and_the_fewest_declines():
    report = calibrate_sessions(
        toy_set(twin_cosine=0.8),
        "toy",
        SessionDesign(enrol=3, frames=3, folds=8),
        margins=(0.0, 0.05),
        thresholds=[0.5, 0.7, 0.85, 0.88, 0.9, 0.999],
    )
    chosen = report.chosen
    assert chosen is not None and chosen.far.errors == 0 and chosen.frr.errors == 0
    assert chosen.k == 3 and chosen.margin == 0.05 and chosen.threshold in (0.85, 0.88, 0.9)
    assert report.figures["meets_target"]
    assert report.figures["genuine_sessions"] == 4 and report.figures["stranger_sessions"] == 12


def test_a_session_record_sets_threshold_margin_and_k_each_overridable_by_a_setting(tmp_path):
    keys.generate(tmp_path / "keys")
    trusted = keys.load_trusted(str(tmp_path / "keys" / "trusted.yaml"))
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, namespace="sc")
        rule = thresholds.CalibratedThreshold(client, settings, "m+lm", 0.9, trusted, 0.02, 3).current_rule()
        assert (rule.threshold, rule.margin, rule.min_agreeing_frames) == (0.9, 0.02, 3)
        assert rule.margin_source == "model default"
        thresholds.store(
            client,
            settings,
            "m+lm",
            0.4,
            keys.load_signer(str(tmp_path / "keys" / "operator.key")),
            margin=0.06,
            min_agreeing_frames=2,
        )
        rule = thresholds.CalibratedThreshold(client, settings, "m+lm", 0.9, trusted, 0.02, 3).current_rule()
        assert (rule.threshold, rule.margin, rule.min_agreeing_frames) == (0.4, 0.06, 2)
        assert {rule.threshold_source, rule.margin_source, rule.min_agreeing_frames_source} == {"calibrated"}
        pinned = settings.replace(policy=SessionPolicy(margin=0.1))
        rule = thresholds.CalibratedThreshold(client, pinned, "m+lm", 0.9, trusted, 0.02, 3).current_rule()
        assert (rule.margin, rule.margin_source, rule.min_agreeing_frames) == (0.1, "setting", 2)


def test_facepay_calibrate_sessions_on_real_faces_reports_and_stores_the_policy(faces, tmp_path):
    """A small real run: faces/ (19 people), enrol 2 photos, sessions of 2, the ArcFace recognizer."""
    started = time.monotonic()
    with EmbeddedValkey(tmp_path / "vk") as server:
        keys.generate(tmp_path / "keys")
        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "FACEPAY_NAMESPACE": "scal",
            "FACEPAY_DEVICE": "cpu",
            "FACEPAY_RECOGNIZER_MODEL": "arcface-mbf-w600k",
            "FACEPAY_OPERATOR_KEY_FILE": str(tmp_path / "keys" / "operator.key"),
            "FACEPAY_TRUSTED_KEYS_FILE": str(tmp_path / "keys" / "trusted.yaml"),
        }
        out = tmp_path / "report"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "facepay",
                "calibrate",
                "--sessions",
                "--data",
                str(faces.root),
                "--enrol",
                "2",
                "--frames",
                "2",
                "--folds",
                "3",
                "--out",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "NON-COMMERCIAL" in done.stdout
        report = json.loads((out / "sessions.json").read_text())
        chosen = report["chosen"]
        assert chosen["session_far"]["errors"] == 0 and chosen["session_frr"]["errors"] == 0
        assert report["genuine_sessions"] > 0 and report["stranger_sessions"] > report["genuine_sessions"]
        client = redis.Redis.from_url(server.url)
        trusted = keys.load_trusted(str(tmp_path / "keys" / "trusted.yaml"))
        settings = Settings(redis_url=server.url, namespace="scal")
        rule = thresholds.CalibratedThreshold(
            client, settings, "arcface-mbf-w600k+facemesh", 0.5, trusted
        ).current_rule()
        assert (rule.threshold, rule.margin, rule.min_agreeing_frames) == (
            chosen["threshold"],
            chosen["margin"],
            chosen["min_agreeing_frames"],
        )
    print(f"real session calibration on faces/: {time.monotonic() - started:.0f} s")


def test_a_policy_leaving_margin_and_k_to_the_space_survives_the_trip_to_a_worker_s_environment():
    from facepay.app.supervisor import settings_to_env
    from facepay.config import load_settings

    policy = load_settings(settings_to_env(Settings())).policy
    assert (policy.margin, policy.min_agreeing_frames) == (None, None)
    pinned = load_settings(settings_to_env(Settings(policy=SessionPolicy(margin=0.04, min_agreeing_frames=4)))).policy
    assert (pinned.margin, pinned.min_agreeing_frames) == (0.04, 4)
