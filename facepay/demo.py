"""`facepay demo`: the whole pipeline on embedded defaults, from enrollment to signed decisions.

It starts an embedded Valkey, the gateway and the four workers as processes, enrolls people
over gRPC, plays camera sessions into the gateway and prints each decision as the payment
backend (here a stand-in that verifies signatures: bring your own) receives it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from facepay.camera import CameraClient, frames_from_path, video_frames
from facepay.config import load_settings
from facepay.contract import pb, rpc
from facepay.decisions import SeenEvents, verify_event
from facepay.supervisor import Pipeline, demo_access

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACEPAY_TEST_DATA", REPO.parent / "shared" / "data")) / "faces"


@dataclass
class Session:
    name: str
    frames: list[bytes]
    expect: str


@dataclass
class Script:
    enroll: dict[str, list[bytes]] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    relax_liveness: bool = False


def say(line: str) -> None:
    print(line, flush=True)


def build_script(args) -> Script:
    if args.enroll or args.camera:
        script = Script(relax_liveness=True)
        for person in sorted(Path(args.enroll).iterdir()) if args.enroll else []:
            if person.is_dir():
                script.enroll[person.name] = frames_from_path(person)
        for i, path in enumerate(args.camera or []):
            script.sessions.append(Session(f"camera-{i}:{Path(path).name}", frames_from_path(path, max_frames=120), "?"))
        return script
    if (DATA / "video" / "selfie_blink.mp4").exists():
        return _script_from_test_data()
    return _script_from_builtin_face()


def _script_from_test_data() -> Script:
    """Enroll from photos and the selfie clip's first second; pay with what the camera sees later."""
    selfie = DATA / "video" / "selfie_blink.mp4"
    people = {p.name: sorted(p.iterdir()) for p in sorted((DATA / "identities").iterdir()) if len(list(p.iterdir())) >= 3}
    chosen = list(people)[:3]
    script = Script()
    script.enroll["selfie-user"] = list(video_frames(selfie, max_frames=3, every=8))
    for name in chosen:
        script.enroll[name] = [p.read_bytes() for p in people[name][:2]]
    live = list(video_frames(selfie, max_frames=90, every=2, start=30))
    script.sessions += [
        Session("selfie video (blinks)", live, "approve selfie-user"),
        Session("one still frame replayed (photo attack)", [live[5]] * 30, "decline no_liveness"),
        Session(f"photos of {chosen[0]} (a photo cannot blink)", [p.read_bytes() for p in people[chosen[0]][2:]] * 3, "decline no_liveness"),
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
    script = Script(relax_liveness=True)
    script.enroll["astronaut"] = [jpeg(face)]
    shifted = [jpeg(cv2.warpAffine(face, _shift(dx), face.shape[1::-1])) for dx in (-6, 0, 6, 12)]
    script.sessions += [
        Session("the astronaut (liveness relaxed: a photo cannot blink)", shifted, "approve astronaut"),
        Session("a cup of coffee", [jpeg(data.coffee())] * 3, "decline no_face"),
    ]
    return script


def _shift(dx: int):
    import numpy as np

    return np.float32([[1, 0, dx], [0, 1, 0]])


def recognizer_notice(model: str) -> str:
    """The demo's line naming the recognizer and its licence (loud when it is non-commercial)."""
    from facepay.models.registry import RECOGNIZERS

    known = RECOGNIZERS.get(model)
    if known is None:
        return f"recognizer: {model} (licence: as its owner states)"
    if known.non_commercial:
        return (f"NOTE: recognizer {model} is for NON-COMMERCIAL research only ({known.licence}); "
                "set FACEPAY_RECOGNIZER_MODEL=dlib-resnet-v1 (CC0) for commercial use")
    return f"recognizer: {model} ({known.licence})"


def run_demo(args) -> int:
    from facepay.models.cache import fetch

    fetch(progress=say)
    script = build_script(args)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    settings = load_settings()
    if script.relax_liveness:
        settings = settings.replace(policy=settings.policy.__class__(**{**settings.policy.__dict__, "require_blink": False}))
        say("note: the blink-liveness rule is relaxed for this demo: still photos cannot blink")
    say(recognizer_notice(settings.recognizer_model))
    access = demo_access({"store-1": ["cam-1"], "store-2": ["cam-2"]})
    say(f"starting embedded Valkey, gateway and 4 workers (logs in {workdir}) …")
    pipeline = Pipeline(settings, workdir, access)
    try:
        pipeline.start()
        say(f"gateway listening on {pipeline.address}")
        _enroll_all(pipeline, script)
        _pay_all(pipeline, script)
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
    with grpc.insecure_channel(pipeline.address) as channel:
        stub = rpc.FaceGatewayStub(channel)
        metadata = (("authorization", f"Bearer {pipeline.settings.operator_token}"),)
        for user, images in script.enroll.items():
            started = time.monotonic()
            reply = stub.Enroll(pb.EnrollRequest(user_id=user, tenant_id="demo", images=images), metadata=metadata, timeout=300)
            accepted = sum(i.accepted for i in reply.images)
            say(f"enroll {user:<16} {pb.EnrollResponse.Status.Name(reply.status):<9} {accepted}/{len(images)} images accepted "
                f"({time.monotonic() - started:.1f}s)")


def _pay_all(pipeline: Pipeline, script: Script) -> None:
    store = "store-1"
    decisions: dict[str, pb.DecisionEvent] = {}
    arrived = threading.Condition()
    channel = grpc.insecure_channel(pipeline.address)
    backend_token = pipeline.access["stores"][store]["backend_token"]
    subscription = rpc.FaceGatewayStub(channel).SubscribeDecisions(
        pb.SubscribeRequest(store_id=store), metadata=(("authorization", f"Bearer {backend_token}"),))

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
    camera = CameraClient(pipeline.address, "cam-1", pipeline.access["cameras"]["cam-1"]["token"], store)
    for i, session in enumerate(script.sessions):
        session_id = f"pos-{i + 1:03d}"
        started = time.monotonic()
        camera.stream_session(session_id, session.frames, fps=12)
        with arrived:
            arrived.wait_for(lambda: session_id in decisions, timeout=120)
        event = decisions.get(session_id)
        took = time.monotonic() - started
        if event is None:
            say(f"{session_id} {session.name}: no decision within 120 s")
            continue
        verdict = pb.Decision.Name(event.decision)
        who = f"user={event.user_id} score={event.score:.3f}" if event.decision == pb.APPROVE else f"reason={','.join(event.reasons)}"
        say(f"{session_id} {session.name:<45} {len(session.frames):>3} frames → {verdict} {who} "
            f"(decided on {event.frames_seen} frames, signed {event.key_id}, {took:.1f}s; expected {session.expect})")
    subscription.cancel()
    camera.close()
    channel.close()
