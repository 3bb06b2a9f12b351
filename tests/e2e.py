"""Helpers for the end-to-end tests: a running pipeline, a camera, an enrolling operator and a
payment backend (a stand-in for the user's own, which verifies every event's signature)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import redis

from facepay.app.camera import CameraClient
from facepay.app.supervisor import Pipeline, demo_access
from facepay.config import FailureLimits, SessionPolicy, Settings
from facepay.contract import pb, rpc
from facepay.decisions import SeenEvents, verify_event
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import connect

STORES = {"store-1": ["cam-1", "cam-2"], "store-2": ["cam-3"]}


def start_pipeline(
    workdir: Path,
    policy: SessionPolicy,
    redis_url: str | None = None,
    replicas: dict[str, int] | None = None,
    **overrides,
) -> Pipeline:
    # Tests stream many declined sessions from one camera: the failure limits get their own test.
    overrides.setdefault("limits", FailureLimits(max_consecutive=10_000, hard_limit=100_000))
    overrides.setdefault("namespace", f"e2e{uuid.uuid4().hex[:6]}")
    valkey = overrides.pop("valkey", None)  # a server or local cluster of the test's (tests/test_cluster*.py)
    archive = overrides.pop("archive", True)
    settings = Settings(
        policy=policy, claim_idle_ms=2000, batch_size=8, batch_wait_ms=30, log_format="json", **overrides
    )
    if redis_url:
        settings = settings.replace(redis_url=redis_url)
    return Pipeline(
        settings,
        workdir,
        demo_access(STORES),
        replicas=replicas,
        embedded=redis_url is None,
        valkey=valkey,
        archive=archive,
    ).start()


def enroll(pipeline: Pipeline, user: str, images: list[bytes], tenant: str = "demo", **metadata) -> pb.EnrollResponse:
    with pipeline.channel() as channel:
        return rpc.FaceGatewayStub(channel).Enroll(
            pb.EnrollRequest(user_id=user, tenant_id=tenant, images=images, metadata=metadata),
            metadata=(("authorization", f"Bearer {pipeline.settings.operator_token}"),),
            timeout=300,
        )


def camera(pipeline: Pipeline, camera_id: str) -> CameraClient:
    store = pipeline.access["cameras"][camera_id]["store"]
    return CameraClient(
        pipeline.address, camera_id, pipeline.access["cameras"][camera_id]["token"], store, tls=pipeline.tls
    )


class Backend:
    """Subscribes to one store's decisions over gRPC and verifies each signature."""

    def __init__(self, pipeline: Pipeline, store: str) -> None:
        self.events: list[pb.DecisionEvent] = []
        self.signed: list[dict] = []
        self._arrived = threading.Condition()
        self._channel = pipeline.channel()
        token = pipeline.access["stores"][store]["backend_token"]
        self._call = rpc.FaceGatewayStub(self._channel).SubscribeDecisions(
            pb.SubscribeRequest(store_id=store, after_entry_id="0-0"), metadata=(("authorization", f"Bearer {token}"),)
        )
        self._keys = {pipeline.settings.signing_key_id: pipeline.settings.signing_key}
        self._store, self._seen = store, SeenEvents()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        try:
            for event in self._call:
                signed = verify_event(event, self._keys, store_id=self._store, seen=self._seen)
                with self._arrived:
                    self.events.append(event)
                    self.signed.append(signed)
                    self._arrived.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(self, session_ids: list[str], timeout_s: float = 180.0) -> dict[str, pb.DecisionEvent]:
        """The decision of each session; a TimeoutError naming the sessions still undecided."""
        with self._arrived:
            self._arrived.wait_for(lambda: set(session_ids) <= {e.session_id for e in self.events}, timeout=timeout_s)
            decided = {e.session_id: e for e in self.events if e.session_id in session_ids}
        missing = [s for s in session_ids if s not in decided]
        if missing:
            raise TimeoutError(
                f"no decision within {timeout_s:g} s for {len(missing)} of {len(session_ids)} "
                f"sessions: {', '.join(missing)}"
            )
        return decided

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str = "", every_s: float = 0.1) -> None:
    """Poll `condition` until it holds; an AssertionError saying what was awaited after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:g} s: {what or condition}")
        time.sleep(every_s)


STAGE_INPUTS = {"detector": "frames", "aligner": "faces", "pose": "aligned", "recognizer": "posed"}


def wait_until_drained(pipeline: Pipeline, timeout_s: float = 60.0) -> None:
    """Until every stage has read and acknowledged every entry of its input: from then on no
    redelivery (of a killed worker's entries, say) can produce anything more."""
    client = connect(pipeline.settings.redis_url)
    partitions = Partitions.of(pipeline.settings)

    def drained() -> bool:
        for stage, name in STAGE_INPUTS.items():
            for stream in partitions.streams(name):
                try:
                    groups = {g["name"]: g for g in client.xinfo_groups(stream)}
                except redis.ResponseError:  # the stream was never written
                    continue
                group = groups.get(stage.encode(), groups.get(stage))
                if group is None or group["pending"] or group.get("lag"):
                    return False
        return True

    wait_until(drained, timeout_s, "every stage's input read and acknowledged")


def new_session() -> str:
    return f"pos-{uuid.uuid4().hex[:10]}"
