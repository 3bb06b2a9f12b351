"""The whole pipeline — gateway, the four model stages, real weights — on a local Valkey Cluster
(3 primaries with a replica each, ACL users per component, `default` off), with partitioned
streams: an enrolled person is approved and a stranger declined, each session once, the
session's keys live in its partition's slot, and the archiver archives both with their frames."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facepay.app.admin import call
from facepay.archive import ArchiveKeys, ArchiveSettings, ArchiveStore
from facepay.config import SessionPolicy
from facepay.contract import pb
from facepay.runtime.embedded_cluster import EmbeddedValkeyCluster
from facepay.runtime.partitions import Partitions
from tests.e2e import Backend, camera, enroll, new_session, start_pipeline, wait_until

pytestmark = pytest.mark.slow

NAMESPACE = "fpe2e"


def test_the_pipeline_on_a_cluster_approves_the_enrolled_and_declines_a_stranger(faces, tmp_path):
    people = faces.identities()
    name, paths = next((n, p) for n, p in sorted(people.items()) if len(p) >= 2)
    stranger = next(p[0] for n, p in sorted(people.items()) if n != name)
    with EmbeddedValkeyCluster(
        tmp_path / "cluster", primaries=3, replicas_per_primary=1, namespace=NAMESPACE
    ) as cluster:
        pipeline = start_pipeline(
            tmp_path / "pipeline",
            SessionPolicy(require_blink=False),
            valkey=cluster,
            namespace=NAMESPACE,
            stream_partitions=4,
            redis_wait_replicas=1,
        )
        try:
            assert pipeline.settings.redis_url.startswith("redis+cluster://")
            assert enroll(pipeline, name, [paths[0].read_bytes()]).status == pb.EnrollResponse.ENROLLED
            backend = Backend(pipeline, "store-1")
            cam = camera(pipeline, "cam-1")
            payer, other = new_session(), new_session()
            cam.stream_session(
                payer, [paths[0].read_bytes()] * 3
            )  # the plumbing, not accuracy (tests/test_pipeline.py)
            cam.stream_session(other, [stranger.read_bytes()] * 3)
            decided = backend.wait_for([payer, other], timeout_s=240)
            assert decided[payer].decision == pb.APPROVE and decided[payer].user_id == name, (
                decided[payer].reasons,
                decided[payer].score,
                decided[payer].threshold,
                name,
            )
            assert decided[other].decision == pb.DECLINE
            assert sorted(e.session_id for e in backend.events) == sorted([payer, other]), "each decided once"
            backend.close()
            cam.close()
            partitions = Partitions.of(pipeline.settings)
            client = cluster.cluster_client()
            decided_key = partitions.session_key(f"store-1/{payer}", "decided", f"store-1/{payer}")
            assert client.exists(decided_key), "the once-only key in the session's partition"
            assert client.keyslot(decided_key) == client.keyslot(partitions.stream("decisions", f"store-1/{payer}"))
            # The admin path (operator's ACL user) on the cluster: a command to a partition of
            # posed, the recognizer's signed reply on the global replies stream.
            operator = pipeline.settings.replace(redis_url=cluster.url_for("operator"))
            assert name in call(operator, "list_users", tenant="demo")["users"]
            archive = archive_of(pipeline)
            wait_until(lambda: {payer, other} <= archived(archive), 120, "both sessions archived")
            assert all(len(archive.read(r.key).frames) == 3 for r in sessions_in(archive)), "with their frames"
        finally:
            pipeline.stop()


def archive_of(pipeline) -> ArchiveStore:
    """The archive as an auditor reads it: the archiver's keys and credentials."""
    env = pipeline.archive_env()
    keys_file = Path(env["FACEPAY_ARCHIVE_KEYS_FILE"])
    return ArchiveStore(
        ArchiveSettings.from_url(pipeline.settings.archive_url, keys_file=keys_file),
        ArchiveKeys.from_file(keys_file),
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def sessions_in(archive: ArchiveStore) -> list:
    now = datetime.now(UTC)
    try:
        return archive.list_sessions("demo", "store-1", now - timedelta(hours=1), now + timedelta(hours=1))
    except Exception:  # noqa: BLE001 - the bucket not made yet: nothing archived yet
        return []


def archived(archive: ArchiveStore) -> set[str]:
    return {r.session_id for r in sessions_in(archive)}
