"""`facepay demo`: the whole pipeline on embedded defaults, from enrollment to signed decisions.

It starts an embedded Valkey, the gateway and the four workers as processes, enrolls people
over gRPC, plays camera sessions into the gateway and prints each decision as the payment
backend (here a stand-in that verifies signatures: bring your own) receives it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from facepay.app.camera import CameraClient, UnreadableMedia, frames_from_path, photos_in, video_frames
from facepay.app.supervisor import Pipeline, demo_access
from facepay.config import SessionPolicy, load_settings
from facepay.contract import pb, rpc
from facepay.decisions import SeenEvents, verify_event
from facepay.models.registry import recognizer_defaults
from facepay.vocabulary import Reason

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("FACEPAY_TEST_DATA", REPO.parent / "shared" / "data")) / "faces"


@dataclass
class Session:
    name: str
    frames: list[bytes]
    expect: str


@dataclass
class Script:
    enroll: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # user → (photo name, bytes)
    sessions: list[Session] = field(default_factory=list)
    relax_liveness: bool = False
    relaxed_why: str = ""


def say(line: str) -> None:
    print(line, flush=True)


def build_script(args) -> Script:
    if args.enroll or args.camera:
        return _script_from_own_data(args)
    if (DATA / "video" / "selfie_blink.mp4").exists():
        return _script_from_test_data()
    return _script_from_builtin_face()


def _script_from_own_data(args) -> Script:
    """The user's photos and recordings, every rule on: a flag, never the demo, relaxes liveness
    (a still frame replayed must decline, as it would at a real till)."""
    relax = getattr(args, "relax_liveness", False)
    script = Script(relax_liveness=relax, relaxed_why="--relax-liveness" if relax else "")
    if args.enroll:
        folder = Path(args.enroll)
        if not folder.is_dir():
            raise UnreadableMedia(f"--enroll {folder}: not a folder (expected one sub-folder of photos per person)")
        for person in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            photos = photos_in(person)
            if not photos:
                raise UnreadableMedia(f"{person}: no photo to enroll {person.name} with")
            script.enroll[person.name] = [(path.name, data) for path, data in photos]
    for i, path in enumerate(args.camera or []):
        script.sessions.append(Session(f"camera-{i}:{Path(path).name}", frames_from_path(path, max_frames=120), ""))
    return script


def _script_from_test_data() -> Script:
    """Enroll from photos and the selfie clip's first second; pay with what the camera sees later."""
    selfie = DATA / "video" / "selfie_blink.mp4"
    people = {
        p.name: sorted(p.iterdir()) for p in sorted((DATA / "identities").iterdir()) if len(list(p.iterdir())) >= 3
    }
    chosen = list(people)[:3]
    script = Script()
    script.enroll["selfie-user"] = [
        (f"{selfie.name} frame {8 * i}", frame) for i, frame in enumerate(video_frames(selfie, max_frames=3, every=8))
    ]
    for name in chosen:
        script.enroll[name] = [(p.name, p.read_bytes()) for p in people[name][:2]]
    live = list(video_frames(selfie, max_frames=90, every=2, start=30))
    script.sessions += [
        Session("selfie video (blinks)", live, "approve selfie-user"),
        Session("one still frame replayed (photo attack)", [live[5]] * 30, "decline no_liveness"),
        Session(
            f"photos of {chosen[0]} (a photo cannot blink)",
            [p.read_bytes() for p in people[chosen[0]][2:]] * 3,
            "decline no_liveness",
        ),
        Session("a stranger", [p.read_bytes() for p in people[list(people)[-1]]] * 2, "decline unknown_face"),
        Session("a dog", [(DATA / "negatives" / "dog.jpg").read_bytes()] * 3, "decline no_face"),
    ]
    return script


def _script_from_builtin_face() -> Script:
    """No test data on this machine: scikit-image's astronaut photo and coffee cup."""
    import cv2
    from skimage import data

    def jpeg(rgb) -> bytes:
        return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()

    face = data.astronaut()
    script = Script(relax_liveness=True, relaxed_why="still photos cannot blink")
    script.enroll["astronaut"] = [("skimage astronaut", jpeg(face))]
    shifted = [jpeg(cv2.warpAffine(face, _shift(dx), face.shape[1::-1])) for dx in (-6, 0, 6, 12)]
    script.sessions += [
        Session("the astronaut (liveness relaxed: a photo cannot blink)", shifted, "approve astronaut"),
        Session("a cup of coffee", [jpeg(data.coffee())] * 3, "decline no_face"),
    ]
    return script


def _shift(dx: int):
    import numpy as np

    return np.array([[1, 0, dx], [0, 1, 0]], dtype=np.float32)


def recognizer_notice(model: str) -> str:
    """The demo's line naming the recognizer and its licence (loud when it is non-commercial)."""
    from facepay.models.registry import RECOGNIZERS

    known = RECOGNIZERS.get(model)
    if known is None:
        return f"recognizer: {model} (licence: as its owner states)"
    if known.non_commercial:
        return (
            f"NOTE: recognizer {model} is for NON-COMMERCIAL research only ({known.licence}); "
            "set FACEPAY_RECOGNIZER_MODEL=dlib-resnet-v1 (CC0) for commercial use"
        )
    return f"recognizer: {model} ({known.licence})"


def run_demo(args) -> int:
    from facepay.models.cache import fetch

    try:
        script = build_script(args)  # the user's files are read before anything starts
    except UnreadableMedia as exc:
        say(f"cannot use your files: {exc}")
        return 2
    fetch(progress=say)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    settings = load_settings()
    if script.relax_liveness:
        settings = settings.replace(policy=dataclasses.replace(settings.policy, require_blink=False))
        say(
            f"note: the blink-liveness rule is relaxed for this demo ({script.relaxed_why}): "
            f"a replayed still frame would be approved"
        )
    say(recognizer_notice(settings.recognizer_model))
    access = demo_access({"store-1": ["cam-1"], "store-2": ["cam-2"]})
    say(f"starting embedded Valkey and SeaweedFS, gateway, 4 workers and the archiver (logs in {workdir}) …")
    pipeline = Pipeline(settings, workdir, access)
    try:
        pipeline.start()
        say(f"gateway listening on {pipeline.address}")
        _enroll_all(pipeline, script)
        _pay_all(pipeline, script)
        _show_archive(pipeline, [f"pos-{i + 1:03d}" for i in range(len(script.sessions))])
        if args.keep_running:
            say("pipeline running; Ctrl-C stops it")
            threading.Event().wait()
    except KeyboardInterrupt:
        say("stopping …")
    finally:
        pipeline.stop()
        say("stopped; no process left behind")
    return 0


def _enroll_all(pipeline: Pipeline, script: Script) -> None:
    with pipeline.channel() as channel:
        stub = rpc.FaceGatewayStub(channel)
        metadata = (("authorization", f"Bearer {pipeline.settings.operator_token}"),)
        for user, photos in script.enroll.items():
            started = time.monotonic()
            images = [data for _, data in photos]
            reply = stub.Enroll(
                pb.EnrollRequest(user_id=user, tenant_id="demo", images=images), metadata=metadata, timeout=300
            )
            for line in enrollment_report(user, [name for name, _ in photos], reply, time.monotonic() - started):
                say(line)


# What a newcomer can do about each enrollment rejection.
REJECTION_HINTS = {
    Reason.NO_FACE: "no face found",
    Reason.MULTIPLE_FACES: "more than one face: crop to the person",
    Reason.FACE_TOO_SMALL: "the face is too small: a closer photo",
    Reason.POSE_YAW: "head turned sideways: face the camera",
    Reason.POSE_PITCH: "head tilted up or down: face the camera",
    Reason.POSE_ROLL: "head tilted to one side (or the photo is sideways)",
    Reason.BLURRY: "not sharp enough",
    Reason.SPOOF_SUSPECTED: "looks like a photo of a photo or a screen",
    Reason.UNREADABLE_IMAGE: "the gateway could not read the image",
}


def enrollment_report(user: str, photo_names: list[str], reply: pb.EnrollResponse, seconds: float) -> list[str]:
    """One line for the enrollment, then one per photo that was not accepted, with its reason."""
    accepted = sum(i.accepted for i in reply.images)
    status = pb.EnrollResponse.Status.Name(reply.status)
    line = f"enroll {user:<16} {status:<9} {accepted}/{len(photo_names)} images accepted ({seconds:.1f}s)"
    if reply.status == pb.EnrollResponse.DUPLICATE:
        line += f"; this face is already enrolled as {reply.duplicate_of} (score {reply.duplicate_score:.3f})"
    lines = [line]
    for verdict in reply.images:
        if verdict.accepted:
            continue
        reason = verdict.detail or pb.Reason.Name(verdict.reason).lower()
        name = photo_names[verdict.index] if 0 <= verdict.index < len(photo_names) else f"photo {verdict.index + 1}"
        hint = REJECTION_HINTS.get(reason)
        lines.append(f"    {name}: rejected, {reason}" + (f" ({hint})" if hint else ""))
    return lines


def describe_rules(policy: SessionPolicy, recognizer_model: str = "dlib-resnet-v1") -> str:
    """The rules a session runs under, as printed beside each session: margin and k where no
    setting gives them are the recognizer's defaults (the demo's fresh gallery has no stored
    session calibration)."""
    defaults = recognizer_defaults(recognizer_model, default_threshold=0.0)
    policy = policy.for_space(defaults.margin, defaults.min_agreeing_frames)
    rules = [
        f"{policy.min_agreeing_frames} agreeing frames",
        f"margin {policy.margin:g}",
        "blink" if policy.require_blink else "blink RELAXED",
    ]
    if policy.min_passive_liveness is not None:
        rules.append(f"anti-spoof ≥ {policy.min_passive_liveness:g}")
    return "rules: " + ", ".join(rules)


def _pay_all(pipeline: Pipeline, script: Script) -> None:
    store = "store-1"
    # one pipeline, one policy: every session runs these
    rules = describe_rules(pipeline.settings.policy, pipeline.settings.recognizer_model)
    decisions: dict[str, pb.DecisionEvent] = {}
    arrived = threading.Condition()
    channel = pipeline.channel()
    backend_token = pipeline.access["stores"][store]["backend_token"]
    subscription = rpc.FaceGatewayStub(channel).SubscribeDecisions(
        pb.SubscribeRequest(store_id=store), metadata=(("authorization", f"Bearer {backend_token}"),)
    )

    def backend() -> None:
        keys, seen = {pipeline.settings.signing_key_id: pipeline.settings.signing_key}, SeenEvents()
        try:
            for event in subscription:
                verify_event(event, keys, store_id=store, seen=seen)  # a real backend rejects events that fail this
                with arrived:
                    decisions[event.session_id] = event
                    arrived.notify_all()
        except grpc.RpcError:
            pass

    threading.Thread(target=backend, daemon=True).start()
    time.sleep(0.5)
    camera = CameraClient(
        pipeline.address, "cam-1", pipeline.access["cameras"]["cam-1"]["token"], store, tls=pipeline.tls
    )
    for i, session in enumerate(script.sessions):
        session_id = f"pos-{i + 1:03d}"
        started = time.monotonic()
        camera.stream_session(session_id, session.frames, fps=12)
        with arrived:
            arrived.wait_for(lambda: session_id in decisions, timeout=120)  # noqa: B023 - waited on in this iteration
        event = decisions.get(session_id)
        took = time.monotonic() - started
        if event is None:
            say(f"{session_id} {session.name}: no decision within 120 s")
            continue
        verdict = pb.Decision.Name(event.decision)
        who = (
            f"user={event.user_id} score={event.score:.3f}"
            if event.decision == pb.APPROVE
            else f"reason={','.join(event.reasons)}"
        )
        expected = f"; expected {session.expect}" if session.expect else ""
        say(
            f"{session_id} {session.name:<45} {len(session.frames):>3} frames → {verdict} {who} "
            f"(decided on {event.frames_seen} frames, signed {event.key_id}, {took:.1f}s{expected}) [{rules}]"
        )
        if Reason.NO_LIVENESS in event.reasons and pipeline.settings.policy.require_blink and not session.expect:
            say("    no blink was seen: blink while recording, or run with --relax-liveness to test identity alone")
    subscription.cancel()
    camera.close()
    channel.close()


def _show_archive(pipeline: Pipeline, session_ids: list[str], store: str = "store-1", tenant: str = "demo") -> None:
    """The audit path: the decided sessions in the archive, and its hash chain verified."""
    from datetime import UTC, datetime, timedelta

    from facepay.archive import ArchiveKeys, ArchiveSettings, ArchiveStore

    if not pipeline.s3 or not pipeline.s3.credentials:  # credentials: once the embedded S3 has started
        return
    credentials = pipeline.s3.credentials
    archive = ArchiveStore(
        ArchiveSettings.from_url(pipeline.settings.archive_url),
        ArchiveKeys.from_file(Path(pipeline.archive_keys_file)),
        access_key_id=credentials.access_key_id,
        secret_access_key=credentials.secret_access_key,
    )
    archive.ensure_bucket()  # the archiver makes it with its first session, which may still be on its way
    start, deadline = datetime.now(UTC) - timedelta(hours=1), time.monotonic() + 30
    archived: set[str] = set()
    while time.monotonic() < deadline:
        end = datetime.now(UTC) + timedelta(minutes=1)
        archived = {r.session_id for r in archive.list_sessions(tenant, store, start, end)} & set(session_ids)
        if archived == set(session_ids):
            break
        time.sleep(0.5)
    report = archive.verify(tenant, store, start, datetime.now(UTC) + timedelta(minutes=1))
    say(
        f"audit archive: {len(archived)} of {len(session_ids)} sessions archived at {pipeline.settings.archive_url} "
        f"(frames encrypted; hash chain {'verified' if report.ok else 'PROBLEMS: ' + ', '.join(sorted(report.kinds()))})"
    )
