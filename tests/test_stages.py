"""The stages on real photos, without Redis: every frame yields exactly one message downstream."""

from __future__ import annotations

import pytest

from facepay.config import Settings
from facepay.messages import AlignedMsg, FaceMsg, FrameMsg, FrameRef, PosedMsg, Rejection, SessionEndMsg
from services.aligner.stage import AlignerStage
from services.detector.stage import DetectorStage
from services.pose.stage import PoseStage


def frames_of(paths, purpose="pay") -> list[FrameMsg]:
    return [
        FrameMsg(ref=FrameRef("s", "store", "cam", i, 0, purpose=purpose), image=p.read_bytes())
        for i, p in enumerate(paths)
    ]


def decoded(stage, batch):
    from facepay.messages import decode

    return [decode(e.payload) for e in stage.process(batch)]


@pytest.fixture(scope="module")
def stages():
    settings = Settings(device="cpu")
    chain = [DetectorStage(settings), AlignerStage(settings), PoseStage(settings)]
    for stage in chain:
        stage.start()
    return chain


def test_every_identity_photo_yields_the_payers_face_and_its_pose(faces, stages):
    detector, aligner, pose = stages
    paths = [p for ps in faces.identities().values() for p in ps]
    posed = decoded(pose, decoded(aligner, decoded(detector, frames_of(paths))))
    assert len(posed) == len(paths)
    assert all(isinstance(m, PosedMsg) for m in posed), [m for m in posed if isinstance(m, Rejection)]
    frontal = sum(m.eligible for m in posed)
    print(f"\n{frontal}/{len(posed)} identity photos pass the pose gate")
    assert frontal >= 0.9 * len(posed)
    assert all(m.reason.startswith("pose_") for m in posed if not m.eligible), "a not-frontal face says why"
    assert set(posed[0].chips) == {"arcface112", "dlib150"}
    assert {"detector", "landmarks", "attributes", "passive_liveness", "pose"} <= set(posed[0].models)


def test_a_photo_without_a_face_is_reported_not_dropped(faces, stages):
    detector = stages[0]
    out = decoded(detector, frames_of([faces.path(r["path"]) for r in faces.manifest("negative")]))
    assert [m.reason for m in out] == ["no_face"] * len(out)


def test_group_photos_yield_a_payer_or_say_they_cannot_tell(faces, stages):
    detector = stages[0]
    out = decoded(detector, frames_of([faces.path(r["path"]) for r in faces.manifest("multi")]))
    assert all(isinstance(m, FaceMsg) or m.reason == "multiple_faces" for m in out)
    assert any(isinstance(m, Rejection) for m in out), "some group photos have no clear payer"


def test_enrollment_needs_exactly_one_face(faces, stages):
    detector = stages[0]
    out = decoded(detector, frames_of([faces.path(r["path"]) for r in faces.manifest("multi")], purpose="enroll"))
    assert all(isinstance(m, Rejection) and m.reason == "multiple_faces" for m in out), [type(m) for m in out]


def test_a_kiosk_face_filling_the_frame_is_found(faces, stages):
    import io

    from PIL import Image

    detector = stages[0]
    first = decoded(detector, frames_of([faces.identities()["alex_lacamoire"][0]]))[0]
    x1, y1, x2, y2 = first.frame_box
    with Image.open(faces.identities()["alex_lacamoire"][0]) as im:
        buf = io.BytesIO()
        im.convert("RGB").crop((int(x1), int(y1), int(x2), int(y2))).save(buf, "JPEG")
    tight = FrameMsg(ref=FrameRef("s", "store", "cam", 0, 0), image=buf.getvalue())
    assert isinstance(decoded(detector, [tight])[0], FaceMsg)


def test_unreadable_bytes_and_session_ends_flow_on(stages):
    detector = stages[0]
    end = SessionEndMsg(ref=FrameRef("s", "store", "cam", -1, 0), frame_count=2)
    out = decoded(detector, [FrameMsg(ref=FrameRef("s", "store", "cam", 0, 0), image=b"junk"), end])
    assert out[0].reason == "unreadable_image" and out[1] == end


def test_the_astronaut_goes_through_every_stage(astronaut, stages):
    import cv2

    detector, aligner, pose = stages
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))[1].tobytes()
    face = decoded(detector, [FrameMsg(ref=FrameRef("s", "store", "cam", 0, 0), image=jpeg)])[0]
    aligned = decoded(aligner, [face])[0]
    posed = decoded(pose, [aligned])[0]
    assert isinstance(aligned, AlignedMsg) and len(aligned.landmarks) == 68 and 0.15 < min(aligned.ear) < 0.5
    assert aligned.gender == "female" and 20 < aligned.age < 70, "age and gender ride in the aligned record"
    assert 0.0 <= aligned.antispoof <= 1.0 and 0.0 <= aligned.liveness <= 1.0
    assert posed.eligible, (posed.pitch, posed.yaw, posed.roll)
