"""Enrollment, the gallery's users and failure limits, through the running pipeline."""

from __future__ import annotations

import time

import pytest
import redis

from facepay.app.admin import call
from facepay.app.enrollment import enroll_tree
from facepay.config import FailureLimits, SessionPolicy, Settings
from facepay.contract import pb
from services.recognizer.limits import FailureLimiter
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline, wait_until

pytestmark = pytest.mark.slow

LIMITS = FailureLimits(max_consecutive=3, first_delay_s=4.0, hard_limit=6)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    running = start_pipeline(tmp_path_factory.mktemp("enroll"), SessionPolicy(require_blink=False), limits=LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def people(faces):
    return {name: paths for name, paths in faces.identities().items() if len(paths) >= 3}


def pay(pipeline, camera_id: str, image: bytes, phone_suffix: str = "") -> pb.DecisionEvent:
    store = pipeline.access["cameras"][camera_id]["store"]
    backend, cam = Backend(pipeline, store), camera(pipeline, camera_id)
    session = new_session()
    cam.stream_session(session, [image] * 3, phone_suffix=phone_suffix)
    event = backend.wait_for([session], timeout_s=120)[session]
    backend.close()
    cam.close()
    return event


def tokens_in_job_data(pipeline) -> list[bytes]:
    import zlib

    client = redis.Redis.from_url(pipeline.settings.redis_url)
    data = [client.hget(k, "data") for k in client.scan_iter("rq:job:*") if client.type(k) == b"hash"]
    return [d for d in data if d and pipeline.settings.operator_token.encode() in zlib.decompress(d)]


def test_a_folder_tree_enrolls_as_rq_jobs_and_users_can_be_listed(pipeline, people, tmp_path):
    tree = tmp_path / "tree"
    chosen = dict(list(people.items())[:3])
    for name, paths in chosen.items():
        (tree / name).mkdir(parents=True)
        (tree / name / paths[0].name).symlink_to(paths[0])
    seen = []
    results = enroll_tree(
        pipeline.settings.redis_url,
        tree,
        pipeline.address,
        pipeline.settings.operator_token,
        "demo",
        inline_workers=2,
        progress=lambda done, total: seen.append((done, total)),
        timeout_s=300,
        tls=pipeline.tls,
    )
    assert {r["user_id"]: r["status"] for r in results} == dict.fromkeys(chosen, "enrolled")
    assert seen[-1] == (3, 3)
    assert not tokens_in_job_data(pipeline), "rq job data (in Redis) carries no operator token"
    listed = call(pipeline.settings, "list_users", tenant="demo")["users"]
    assert set(chosen) <= set(listed)
    shown = call(pipeline.settings, "show_user", user_id=next(iter(chosen)))
    assert shown["enrolled"] and {t["kind"] for t in shown["templates"]} == {"mean", "sample"}


def test_photos_failing_a_quality_gate_are_reported_with_their_reason(pipeline, faces):
    no_face = faces.path(faces.manifest("negative")[0]["path"]).read_bytes()
    group = faces.path(faces.manifest("multi")[0]["path"]).read_bytes()
    reply = enroll(pipeline, "nobody", [no_face, group])
    assert reply.status == pb.EnrollResponse.REJECTED
    assert [i.detail for i in reply.images] == ["no_face", "multiple_faces"]


def test_a_face_already_enrolled_under_another_user_is_flagged_not_merged(pipeline, people):
    name, paths = list(people.items())[3]
    assert enroll(pipeline, name, [paths[0].read_bytes()]).status == pb.EnrollResponse.ENROLLED
    reply = enroll(pipeline, "impostor-account", [paths[1].read_bytes()])
    assert reply.status == pb.EnrollResponse.DUPLICATE and reply.duplicate_of == name
    assert not call(pipeline.settings, "show_user", user_id="impostor-account")["enrolled"]


def test_the_phone_suffix_limits_the_search_to_matching_users(pipeline, people):
    name, paths = list(people.items())[4]
    enroll(pipeline, name, [paths[0].read_bytes()], phone_suffix="4321")
    other = pay(pipeline, "cam-1", paths[1].read_bytes(), phone_suffix="9999")
    assert other.decision == pb.DECLINE, "no match outside the suffix"
    mine = pay(pipeline, "cam-1", paths[1].read_bytes(), phone_suffix="4321")
    assert mine.decision == pb.APPROVE and mine.user_id == name


def test_a_deleted_user_is_erased_and_their_next_session_declines(pipeline, people):
    name, paths = list(people.items())[5]
    enroll(pipeline, name, [paths[0].read_bytes()])
    assert pay(pipeline, "cam-1", paths[1].read_bytes()).decision == pb.APPROVE
    removed = call(pipeline.settings, "delete_user", user_id=name)["templates_removed"]
    assert removed >= 2, "the mean template and every sample"
    assert call(pipeline.settings, "delete_user", user_id=name)["templates_removed"] == 0, "idempotent"
    assert pay(pipeline, "cam-1", paths[1].read_bytes()).decision == pb.DECLINE


def test_consecutive_failures_at_a_camera_impose_a_growing_back_off(pipeline, people, faces):
    stranger = faces.identities()
    stranger = next(paths for n, paths in stranger.items() if len(paths) == 1)[0].read_bytes()
    name, paths = list(people.items())[6]
    enroll(pipeline, name, [paths[0].read_bytes()])
    for _ in range(LIMITS.max_consecutive):
        assert pay(pipeline, "cam-3", stranger).reasons == ["unknown_face"]
    locked = pay(pipeline, "cam-3", paths[1].read_bytes())
    assert locked.decision == pb.DECLINE and list(locked.reasons) == ["locked_out"], "even the right face waits"
    # How the delay grows is tests/test_limits.py's, on a moved clock; here: it ends, and then the face pays.
    limiter = FailureLimiter(redis.Redis.from_url(pipeline.settings.redis_url), pipeline.settings)
    wait_until(lambda: limiter.locked("cam-3") is None, timeout_s=LIMITS.first_delay_s + 10)
    assert pay(pipeline, "cam-3", paths[1].read_bytes()).decision == pb.APPROVE, "after the delay, and it resets"


def test_failure_counts_survive_restarts_and_a_hard_lock_needs_an_operator(pipeline):
    settings = pipeline.settings
    client = redis.Redis.from_url(settings.redis_url)
    limiter = FailureLimiter(client, settings)
    for i in range(LIMITS.hard_limit):
        limiter.record(f"s-{i}", "cam-x", "no_liveness", approved=False, candidate_user="mallory")
    fresh = FailureLimiter(redis.Redis.from_url(settings.redis_url), settings)  # as a restarted worker
    assert fresh.locked("cam-x") == "camera" and fresh.locked("cam-y", "mallory") == "user"
    years_later = FailureLimiter(fresh.redis, settings, clock=lambda: time.time() + 10 * 365 * 24 * 3600)
    assert years_later.locked("cam-x") == "camera", "a hard lock has no expiry"
    call(settings, "reset_lockout", kind="camera", subject="cam-x")
    call(settings, "reset_lockout", kind="user", subject="mallory")
    assert fresh.locked("cam-x", "mallory") is None


@pytest.mark.redis7
def test_users_commands_say_when_no_recognizer_answers(tmp_path):
    from facepay import keys
    from facepay.app.admin import AdminError

    keys.generate(tmp_path)
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0",
        namespace="nobody-home",
        operator_key_file=str(tmp_path / "operator.key"),
        trusted_keys_file=str(tmp_path / "trusted.yaml"),
    )
    try:
        redis.Redis(port=6379, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    with pytest.raises(AdminError, match="no recognizer answered"):
        call(settings, "list_users", timeout_s=1)


def test_blurred_and_small_photos_are_refused_by_the_quality_gates(pipeline, people):
    import cv2
    import numpy as np

    name, paths = list(people.items())[7]
    good = paths[0].read_bytes()
    image = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    blurred = cv2.imencode(".jpg", cv2.GaussianBlur(image, (0, 0), 6))[1].tobytes()
    scale = 60 / max(image.shape[:2]) * 2.5  # the face ends up ~50-70 px wide: found, but too small
    small = cv2.imencode(".jpg", cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))[1].tobytes()
    reply = enroll(pipeline, name, [good, blurred, small])
    assert reply.status == pb.EnrollResponse.ENROLLED
    assert [(i.accepted, i.detail) for i in reply.images] == [(True, ""), (False, "blurry"), (False, "face_too_small")]


def test_a_model_change_reindexes_every_user_from_the_kept_chips_and_delete_reaches_both(pipeline, people):
    from facepay.app.reindex import reindex

    name, paths = list(people.items())[8]
    assert enroll(pipeline, name, [paths[0].read_bytes(), paths[1].read_bytes()]).status == pb.EnrollResponse.ENROLLED
    results = {r["user_id"]: r for r in reindex(pipeline.settings, "faceres-hse-v1", inline_workers=1, timeout_s=300)}
    assert results[name]["status"] == "reindexed" and results[name]["samples"] == 2
    new_space = results[name]["space"]
    assert new_space == "faceres-hse-v1+facemesh"
    assert name in call(pipeline.settings, "list_users", space=new_space)["users"]
    call(pipeline.settings, "delete_user", user_id=name)
    assert name not in call(pipeline.settings, "list_users", space=new_space)["users"], "erased in every space"


def test_a_gallery_moves_to_arcface_without_anyone_enrolling_again(pipeline, faces):
    """Issue 11: the kept chips include the ArcFace template's, so `reindex --model arcface-mbf-w600k`
    moves every user into the ArcFace space, and those chips are one person to ArcFace."""
    from facepay.app.reindex import reindex
    from facepay.images import decode_trusted
    from services.recognizer.embedder import load_embedder
    from services.recognizer.enrollment import FaceSources

    # Someone no other test here enrols (`people` are those with 3+ photos).
    name, paths = next((n, p) for n, p in faces.identities().items() if len(p) == 2)
    assert enroll(pipeline, name, [paths[0].read_bytes(), paths[1].read_bytes()]).status == pb.EnrollResponse.ENROLLED
    kept = FaceSources(redis.Redis.from_url(pipeline.settings.redis_url), pipeline.settings).load(name)
    assert len(kept["chips"]) == 2 and all({"arcface112", "dlib150"} <= set(c) for c in kept["chips"])
    results = {
        r["user_id"]: r for r in reindex(pipeline.settings, "arcface-mbf-w600k", inline_workers=1, timeout_s=300)
    }
    assert results[name]["status"] == "reindexed" and results[name]["samples"] == 2
    assert results[name]["space"] == "arcface-mbf-w600k+facemesh"
    assert name in call(pipeline.settings, "list_users", space="arcface-mbf-w600k+facemesh")["users"]
    arcface = load_embedder("arcface-mbf-w600k", "cpu")
    vectors = arcface.embed([decode_trusted(c["arcface112"]) for c in kept["chips"]])
    assert float(vectors[0] @ vectors[1]) > arcface.default_threshold, "the kept chips are one person to ArcFace"
