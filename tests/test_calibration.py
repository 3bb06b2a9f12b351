"""Threshold calibration: the FAR/FRR maths on toy scores, and one real run on the dev faces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facepay.app.calibration import (
    Embedded,
    ScoreSet,
    choose_threshold,
    clopper_pearson_upper,
    eer,
    far_frr,
    identification,
    not_measurable,
    pair_scores,
    tar_at_far,
    trials_for,
)

GENUINE = np.array([0.95, 0.90, 0.85, 0.60])
IMPOSTOR = np.array([0.10, 0.20, 0.30, 0.40, 0.50, 0.70, 0.88, 0.20, 0.30, 0.10])


@pytest.mark.parametrize("most_central", [None, np.array([True, False])])
def test_an_embedding_cache_reads_back_what_was_saved(tmp_path, most_central):
    # most_central is None outside labelled mode; the cache is read without pickle (it may come from disk).
    from pathlib import Path

    embedded = Embedded(
        [Path("a/1.jpg"), Path("b/2.jpg")],
        ["a", "b"],
        np.eye(2, dtype=np.float32),
        np.array([True, True]),
        ["", ""],
        ["", ""],
        np.array([80, 90]),
        np.array([5.0, 6.0]),
        1.5,
        "setup",
        most_central,
    )
    embedded.save(tmp_path / "cache.npz")
    loaded = Embedded.load(tmp_path / "cache.npz")
    assert loaded.labels == ["a", "b"] and loaded.setup == "setup"
    if most_central is None:
        assert loaded.most_central is None
    else:
        assert loaded.most_central is not None and loaded.most_central.tolist() == [True, False]


def test_far_and_frr_follow_the_seed_definitions():
    far, frr = far_frr(GENUINE, IMPOSTOR, [0.0, 0.5, 0.6, 0.86, 0.88, 0.96])
    # FAR = impostor ≥ S / 10, FRR = genuine < S / 4: a score equal to S is accepted.
    assert far.tolist() == [1.0, 0.3, 0.2, 0.1, 0.1, 0.0]
    assert frr.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0]


def test_eer_is_where_far_and_frr_meet():
    value, threshold = eer(GENUINE, IMPOSTOR)
    # S = 0.70: FAR 2/10 (0.70, 0.88), FRR 1/4 (0.60) → |diff| 0.05, the closest; S = 0.85: 0.1 vs 0.25.
    assert threshold == pytest.approx(0.70)
    assert value == pytest.approx((0.2 + 0.25) / 2)
    separable = eer(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3]))
    assert separable[0] == 0.0 and 0.3 < separable[1] <= 0.8


def test_clopper_pearson_upper_bound_known_values():
    assert clopper_pearson_upper(0, 16_094) == pytest.approx(1e-4, rel=1e-3)  # FIDO's FAR 1:10,000 sample
    assert clopper_pearson_upper(0, 100) == pytest.approx(1 - 0.2 ** (1 / 100))  # closed form for 0 errors
    # By definition: the p at which seeing ≤ 3 errors in 100 has probability 1 − 0.8.
    from scipy.stats import binom

    assert binom.cdf(3, 100, clopper_pearson_upper(3, 100)) == pytest.approx(0.2)
    assert clopper_pearson_upper(5, 5) == 1.0 and clopper_pearson_upper(0, 0) == 1.0
    assert trials_for(1e-4) == 16_094
    assert clopper_pearson_upper(1, 1000) > clopper_pearson_upper(0, 1000) > 0.0


def test_too_few_impostors_is_reported_not_measured():
    scores = ScoreSet(GENUINE, IMPOSTOR, 2, 5)
    assert not_measurable(10, 1e-2) == "not measurable: only 10 impostor pairs (1/10 > 0.01)"
    row = tar_at_far(scores, 1e-2)
    assert row["measurable"] is False and "only 10 impostor pairs" in row["reason"]
    ok = tar_at_far(scores, 0.1)  # 1 of 10 impostors may pass: S just above the 2nd highest (0.70)
    assert ok["measurable"] and 0.70 < ok["threshold"] < 0.71 and ok["tar"] == 0.75
    assert ok["far"] == {
        "value": 0.1,
        "errors": 1,
        "trials": 10,
        "subjects": 5,
        "upper80": pytest.approx(clopper_pearson_upper(1, 10)),
    }


def test_threshold_choice_uses_the_upper_bound_when_the_pairs_allow_it():
    rng = np.random.default_rng(0)
    impostor = rng.normal(0.5, 0.1, 100_000)
    genuine = rng.normal(0.95, 0.02, 500)
    scores = ScoreSet(genuine, impostor, 50, 400)
    choice = choose_threshold(scores, 1e-4)
    assert choice.basis == "upper_bound" and choice.far.upper <= 1e-4
    # The smallest such S: one more impostor accepted would break the bound.
    k = choice.far.errors
    assert clopper_pearson_upper(k + 1, len(impostor)) > 1e-4
    assert np.sort(impostor)[-(k + 1)] < choice.threshold
    # 12,000 impostor pairs: 1/12,000 < 1e-4 is measurable, but even 0 errors bound FAR at 1.3e-4.
    few = choose_threshold(ScoreSet(genuine, impostor[:12_000], 50, 400), 1e-4)
    assert few.basis == "point_estimate" and few.far.errors <= 1 and few.far.upper > 1e-4
    lowest = choose_threshold(scores, 1e-7)
    assert lowest.basis == "lowest_measurable" and lowest.far.errors == 0
    assert lowest.threshold > impostor.max() and lowest.effective_target_far == pytest.approx(1e-5)


def test_pair_scores_count_every_pair_once_and_failures_as_rejects():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]]  # a, a, b, b, c: unit vectors
    scores = pair_scores(x, ["a", "a", "b", "b", "c"], usable=np.array([1, 1, 1, 0, 1], bool))
    assert len(scores.genuine) == 2 and np.isneginf(scores.genuine).sum() == 1  # b's pair lost its face
    assert len(scores.impostor) == 2 * 1 + 2 * 1 + 1 * 1  # a–b (b's usable one), a–c, b–c
    assert scores.genuine_subjects == 2 and scores.impostor_subjects == 3
    ident = identification(
        x,
        ["a", "a", "b", "b", "c"],
        ["1", "2", "1", "2", "1"],
        np.ones(5, bool),
        enrolled_ids={"a", "b"},
        thresholds={"t": 0.5},
    )
    assert ident["rank1"]["value"] == 1.0 and ident["non_mated_probes"] == 1
    assert ident["at_thresholds"]["t"]["fpir"]["errors"] == 0
    assert ident["fnir_at_fpir"][0]["measurable"] is False


@pytest.fixture(scope="module")
def face_embedder():
    from facepay.app.offline import FaceEmbedder
    from facepay.config import Settings

    # The pipeline's defaults (landmarks, recognizer); the aligner's extras are not needed here.
    return FaceEmbedder(Settings(device="cpu", attributes_model="off", passive_liveness=False), labelled=True)


def test_offline_embedder_scores_what_the_pipeline_scores(faces, face_embedder):
    """Same crop, landmarks, chip, pose and vector as the detector → aligner → pose stages."""
    from facepay.app.offline import EmbeddedFace
    from facepay.images import decode_image, decode_trusted
    from facepay.messages import FrameMsg, FrameRef, PosedMsg, decode
    from services.aligner.stage import AlignerStage
    from services.detector.stage import DetectorStage
    from services.pose.stage import PoseStage

    paths = [ps[0] for ps in faces.identities().values()][:4]
    messages = [FrameMsg(ref=FrameRef("s", "store", "cam", i, 0), image=p.read_bytes()) for i, p in enumerate(paths)]
    for stage in (
        DetectorStage(face_embedder.settings),
        AlignerStage(face_embedder.settings),
        PoseStage(face_embedder.settings),
    ):
        stage.start()
        messages = [decode(e.payload) for e in stage.process(messages)]
    assert all(isinstance(m, PosedMsg) for m in messages)
    template = face_embedder.embedder.chip_template
    expected = face_embedder.embedder.embed([decode_trusted(m.chips[template]) for m in messages])
    got = face_embedder.embed_images([decode_image(p.read_bytes()) for p in paths])
    for message, vector, face in zip(messages, expected, got, strict=True):
        assert isinstance(face, EmbeddedFace)
        assert float(face.embedding @ vector) > 0.9999
        assert face.pose.yaw == pytest.approx(message.yaw, abs=1e-3) and face.pose_reason == message.reason
        assert face.face_px >= 40 and face.sharpness > 0


@pytest.fixture(scope="module")
def dev_report(faces, face_embedder, tmp_path_factory):
    from facepay.app.calibration import calibrate

    out = tmp_path_factory.mktemp("calibration")
    return calibrate(faces.root, out, 1e-5, face_embedder), out


@pytest.mark.slow  # embeds and scores every pair of the face set
def test_calibrating_on_the_dev_faces_separates_strangers(dev_report):
    report, out = dev_report
    for name in ("report.json", "report.md", "det.png", "roc.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["threshold"] == report.threshold and saved["model_id"] == report.model_id == "dlib-resnet-v1"
    figures = report.figures
    assert figures["images"] == 64 and figures["subjects"] == 19
    # 1,879 impostor pairs cannot show FAR 1e-5: the lowest measurable is chosen, and said so.
    assert figures["chosen"]["basis"] == "lowest_measurable"
    assert "not measurable" in figures["chosen"]["note"]
    assert not figures["tar_at_far"][-1]["measurable"]
    assert figures["chosen"]["far"]["errors"] == 0, "a stranger scores at or above the chosen threshold"
    assert figures["chosen"]["far"]["upper80"] == pytest.approx(clopper_pearson_upper(0, figures["impostor_pairs"]))
    assert figures["identification_closed_set"]["rank1"]["value"] >= 0.9
    assert figures["identification_open_set"]["rank1"]["value"] >= 0.9
    assert figures["identification_open_set"]["at_thresholds"]["chosen"]["fpir"]["errors"] == 0
