"""The audit archive on the embedded SeaweedFS (a real `weed server` process, real S3 over HTTP):
writing, listing by store and time, reading back and decrypting, the hash chain catching a
removed, an altered and a reordered session, two replicas appending at once, the retention
sweep, erasure, and an outage of the object store."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facepay.archive import (
    ArchiveAccessDenied,
    ArchivedFrame,
    ArchivedSession,
    ArchiveKeyError,
    ArchiveKeys,
    ArchiveSettings,
    ArchiveStore,
    ArchiveTampered,
    ArchiveUnavailable,
    Candidate,
    EmbeddedS3,
    SignedDecision,
)
from facepay.archive.container import SealedSession
from facepay.signing import sign

DECISION_KEY = "decision-signing-key-for-tests"
# Sessions decided over the last hours, archived now (as the archiver does, seconds after).
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedS3:
    with EmbeddedS3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture(scope="module")
def photos(request: pytest.FixtureRequest) -> list[bytes]:
    """Real face photos as a camera would send them: the `faces` data, else scikit-image's
    astronaut (the archive does not look at faces; it must not need the data set to be tested)."""
    try:
        faces = request.getfixturevalue("faces")
        return [p.read_bytes() for people in faces.identities().values() for p in people][:12]
    except pytest.skip.Exception:
        import cv2
        from skimage import data

        image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        return [
            cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for quality in (70, 80, 90)
        ]


@pytest.fixture
def keys() -> ArchiveKeys:
    return ArchiveKeys.generate(["acme", "globex"])


def make_store(s3: EmbeddedS3, keys: ArchiveKeys, prefix: str | None = None, **settings: object) -> ArchiveStore:
    """One bucket, as an install has; each test archives under its own prefix."""
    url = f"{s3.url}/facepay-archive/{prefix or 'test-' + uuid.uuid4().hex[:12]}"
    store = ArchiveStore(
        ArchiveSettings.from_url(url, **settings),
        keys,
        access_key_id=s3.credentials.access_key_id,
        secret_access_key=s3.credentials.secret_access_key,
    )
    store.ensure_bucket()
    return store


@pytest.fixture
def archive(s3: EmbeddedS3, keys: ArchiveKeys) -> ArchiveStore:
    return make_store(s3, keys)


def session_at(
    decided: datetime,
    photos: list[bytes],
    *,
    tenant: str = "acme",
    store: str = "store-1",
    user: str | None = "alice",
    frames: int = 4,
) -> ArchivedSession:
    session_id = uuid.uuid4().hex
    decided_ms = int(decided.timestamp() * 1000)
    event = {
        "session": session_id,
        "store": store,
        "tenant": tenant,
        "decision": "approve" if user else "decline",
        "user_id": user,
        "score": 0.97,
        "threshold": 0.943,
        "decided_ms": decided_ms,
    }
    entry = sign(event, DECISION_KEY, "k1")
    archived_frames = [
        ArchivedFrame(
            index=i,
            received_ms=decided_ms - 1000 + i * 100,
            image=photos[i % len(photos)],
            image_format="jpeg",
            face_box=(10.0, 20.0, 110.0, 140.0),
            face_points=[(40.0, 60.0)] * 5,
            detector_score=0.99,
            landmarks=[(float(i), float(i + 1))] * 68,
            eye_aspect_ratio=0.27,
            liveness={"antispoof": 0.91},
            pitch=1.5,
            yaw=-3.0,
            roll=0.5,
            eligible=True,
            top_k=[Candidate("alice", 0.97), Candidate("bob", 0.41)],
            embedding=[0.1] * 128,
        )
        for i in range(frames)
    ]
    return ArchivedSession(
        session_id=session_id,
        tenant=tenant,
        store=store,
        camera="cam-1",
        first_frame_ms=decided_ms - 1000,
        decided_ms=decided_ms,
        decision=SignedDecision(entry[b"payload"], entry[b"sig"].decode(), "k1"),
        models={"detector": "mtcnn@facenet-pytorch-2.6.0", "recognizer": "dlib-resnet-v1+facemesh"},
        threshold=0.943,
        policy={"min_agreeing_frames": 3, "require_blink": True},
        frames=archived_frames,
    )


def raw_put(archive: ArchiveStore, key: str, body: bytes) -> None:
    """What an attacker with write access to the bucket (but not the archive keys) can do."""
    archive.client.put_object(Bucket=archive.bucket, Key=key, Body=body)


def raw_get(archive: ArchiveStore, key: str) -> bytes:
    return archive.client.get_object(Bucket=archive.bucket, Key=key)["Body"].read()


def fill(archive: ArchiveStore, photos: list[bytes], count: int, **kwargs: object) -> list:
    sessions = [session_at(T0 + timedelta(minutes=7 * i), photos, **kwargs) for i in range(count)]
    return [(s, archive.archive(s)) for s in sessions]


# --- the embedded server ---------------------------------------------------------------------


def test_embedded_s3_listens_on_loopback_with_generated_credentials_and_refuses_anonymous(s3: EmbeddedS3) -> None:
    import urllib.error
    import urllib.request

    assert s3.url.startswith("http://127.0.0.1:")
    assert (s3.config_file.stat().st_mode & 0o777) == 0o600
    assert s3.credentials.secret_access_key not in s3.url
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(s3.url + "/")
    assert refused.value.code == 403


def listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket the process listens on (from /proc)."""
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                host_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(host_hex)
                host = (
                    ".".join(str(b) for b in raw[::-1])
                    if len(raw) == 4
                    else ("::1" if raw == bytes(15) + b"\x01" else raw.hex())
                )
                found.add(f"{host}:{int(port_hex, 16)}")
    return found


def test_every_port_of_the_embedded_server_is_on_loopback(s3: EmbeddedS3) -> None:
    addresses = listening_addresses(s3.process.pid)
    assert f"127.0.0.1:{s3.s3_port}" in addresses
    assert {a.rsplit(":", 1)[0] for a in addresses} == {"127.0.0.1"}, addresses


def test_the_filer_and_volume_http_ports_refuse_requests_without_a_token(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes]
) -> None:
    """Only the S3 gateway (signed requests) is a way in: weed's filer and volume HTTP APIs
    would otherwise let any local process read or write every object."""
    import urllib.error
    import urllib.request

    receipt = archive.archive(session_at(T0, photos))
    _master, _, volume, _, filer, _, _ = s3._ports
    attempts = [
        urllib.request.Request(f"http://127.0.0.1:{filer}/buckets/{archive.bucket}/{receipt.key}"),
        urllib.request.Request(f"http://127.0.0.1:{filer}/buckets/{archive.bucket}/"),
        urllib.request.Request(
            f"http://127.0.0.1:{filer}/buckets/{archive.bucket}/planted.fpa", data=b"x", method="PUT"
        ),
        urllib.request.Request(f"http://127.0.0.1:{filer}/buckets/{archive.bucket}/{receipt.key}", method="DELETE"),
        urllib.request.Request(f"http://127.0.0.1:{volume}/1,01637037d6", data=b"x", method="PUT"),
    ]
    for request in attempts:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401, (request.method, request.full_url, refused.value.code)
    assert archive.read(receipt.key).frames


def test_wrong_secret_is_refused_with_a_clear_error(s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]) -> None:
    store = ArchiveStore(
        ArchiveSettings.from_url(f"{s3.url}/facepay-archive"),
        keys,
        access_key_id=s3.credentials.access_key_id,
        secret_access_key="not-the-secret",
    )
    with pytest.raises(ArchiveAccessDenied, match="AWS_SECRET_ACCESS_KEY") as refused:
        store.archive(session_at(T0, photos))
    assert not refused.value.retryable


def test_no_key_ever_reaches_the_bucket(archive: ArchiveStore, photos: list[bytes]) -> None:
    receipt = archive.archive(session_at(T0, photos, user="alice"))
    archive.erase_user("acme", "alice")
    archive.archive(session_at(T0 + timedelta(minutes=1), photos, user="bob"))
    secrets = [archive.keys.signing_key] + [k for t in archive.keys.tenants.values() for k in t.keys.values()]
    needles = [form for key in secrets for form in (key, key.hex().encode(), key.hex().upper().encode())]

    def assert_no_key_stored() -> None:
        stored = list(archive._list(archive.prefix))
        assert stored
        for key in stored:
            assert not any(needle in raw_get(archive, key) for needle in needles), key

    assert_no_key_stored()
    archive.sweep(now=T0 + timedelta(days=365))  # and the retention checkpoint it writes
    assert_no_key_stored()
    assert receipt


# --- writing, listing, reading -----------------------------------------------------------------


def test_a_session_reads_back_decrypted_as_it_was_archived(archive: ArchiveStore, photos: list[bytes]) -> None:
    session = session_at(T0, photos)
    receipt = archive.archive(session)
    assert receipt.seq == 1 and not receipt.already_archived
    assert receipt.key.endswith(
        f"sessions/acme/store-1/{T0:%Y/%m/%d/%H}/{int(T0.timestamp() * 1000):013d}-{session.session_id}.fpa"
    )

    back = archive.read(receipt.key)
    assert back.frames[0].image == photos[0]
    assert [f.top_k for f in back.frames] == [f.top_k for f in session.frames]
    assert (
        back.frames[2].landmarks == session.frames[2].landmarks
        and back.frames[2].face_box == session.frames[2].face_box
    )
    assert back.decision == session.decision and back.user_id == "alice"
    assert (back.models, back.threshold, back.policy) == (session.models, session.threshold, session.policy)
    assert all(f.embedding is None for f in back.frames), "embeddings are dropped unless configured"


def test_embeddings_are_kept_only_when_configured(s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]) -> None:
    archive = make_store(s3, keys, keep_embeddings=True)
    receipt = archive.archive(session_at(T0, photos))
    assert archive.read(receipt.key).frames[0].embedding == [0.1] * 128


def test_frames_are_encrypted_at_rest_and_need_the_tenant_key(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes]
) -> None:
    receipt = archive.archive(session_at(T0, photos))
    stored = raw_get(archive, receipt.key)
    assert photos[0][200:264] not in stored, "no frame bytes in the clear"
    assert b"alice" in stored, "the signed decision event stays readable for audit"

    other_keys = ArchiveKeys.generate(["acme"])
    other_keys = ArchiveKeys(archive.keys.signing_key, other_keys.tenants)
    stranger = make_store(s3, other_keys, prefix=archive.prefix.rstrip("/"))
    with pytest.raises(ArchiveKeyError):
        stranger.read(receipt.key)


def test_archiving_the_same_session_twice_stores_and_chains_it_once(archive: ArchiveStore, photos: list[bytes]) -> None:
    session = session_at(T0, photos)
    first = archive.archive(session)
    again = archive.archive(session)
    assert again.already_archived and (again.key, again.seq, again.content_sha256) == (
        first.key,
        first.seq,
        first.content_sha256,
    )
    assert archive.verify("acme", "store-1", T0 - timedelta(hours=1), T0 + timedelta(hours=1)).ok


def test_listing_a_store_and_time_range_returns_only_those_sessions_in_decision_order(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    archived = fill(archive, photos, 12)  # 09:00, 09:07, … 10:17
    fill(archive, photos, 3, store="store-2")
    fill(archive, photos, 2, tenant="globex", store="store-9")

    refs = archive.list_sessions("acme", "store-1", T0 + timedelta(minutes=30), T0 + timedelta(minutes=70))
    expected = [
        s.session_id
        for s, _ in archived
        if T0 + timedelta(minutes=30) <= datetime.fromtimestamp(s.decided_ms / 1000, UTC) < T0 + timedelta(minutes=70)
    ]
    assert [r.session_id for r in refs] == expected and len(expected) == 5
    assert archive.tenants() == ["acme", "globex"]
    assert archive.stores("acme") == ["store-1", "store-2"]


def test_ids_that_cannot_name_an_object_are_refused(archive: ArchiveStore, photos: list[bytes]) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="store"):
        archive.archive(replace(session_at(T0, photos), store="../other-tenant"))
    assert archive.tenants() == []


# --- tamper evidence ------------------------------------------------------------------------------


def window() -> tuple[datetime, datetime]:
    return T0 - timedelta(hours=1), T0 + timedelta(hours=3)


def test_an_untouched_chain_verifies(archive: ArchiveStore, photos: list[bytes]) -> None:
    fill(archive, photos, 6)
    report = archive.verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert (report.checked_sessions, report.checked_entries) == (6, 6)


def test_verify_detects_a_removed_session(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 6)
    archive.client.delete_object(Bucket=archive.bucket, Key=archived[3][1].key)

    report = archive.verify("acme", "store-1", *window())
    assert [(p.kind, p.session_id) for p in report.problems] == [("removed", archived[3][0].session_id)]


def test_verify_detects_a_removed_session_and_its_chain_entry(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 6)
    archive.client.delete_object(Bucket=archive.bucket, Key=archived[3][1].key)
    archive.client.delete_object(Bucket=archive.bucket, Key=archive._entry_key("acme", "store-1", 4))

    assert "removed" in archive.verify("acme", "store-1", *window()).kinds()


def test_verify_detects_the_last_sessions_cut_off_the_chain(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 6)
    for _, receipt in archived[4:]:
        archive.client.delete_object(Bucket=archive.bucket, Key=receipt.key)
        archive.client.delete_object(Bucket=archive.bucket, Key=archive._entry_key("acme", "store-1", receipt.seq))

    assert "truncated" in archive.verify("acme", "store-1", *window()).kinds()


def test_cutting_the_chain_head_and_tail_stops_the_archiver_instead_of_chaining_on(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    """Deleting the head with the newest entries and sessions would let the next append
    continue from the cut, hiding it for good; the archiver refuses and verify says why."""
    archived = fill(archive, photos, 6)
    archive.client.delete_object(Bucket=archive.bucket, Key=f"{archive._chain('acme', 'store-1')}head.json")
    for _, receipt in archived[4:]:
        archive.client.delete_object(Bucket=archive.bucket, Key=receipt.key)
        archive.client.delete_object(Bucket=archive.bucket, Key=archive._entry_key("acme", "store-1", receipt.seq))

    with pytest.raises(ArchiveTampered, match="head") as refused:
        archive.archive(session_at(T0 + timedelta(hours=1), photos))
    assert not refused.value.retryable
    assert "head_missing" in archive.verify("acme", "store-1", *window()).kinds()


def test_a_forged_chain_head_stops_the_archiver(archive: ArchiveStore, photos: list[bytes]) -> None:
    fill(archive, photos, 3)
    head_key = f"{archive._chain('acme', 'store-1')}head.json"
    document = json.loads(raw_get(archive, head_key))
    document["body"]["seq"] = 1
    raw_put(archive, head_key, json.dumps(document).encode())

    with pytest.raises(ArchiveTampered, match="signature"):
        archive.archive(session_at(T0 + timedelta(hours=1), photos))
    assert "bad_signature" in archive.verify("acme", "store-1", *window()).kinds()


def test_an_unreadable_chain_tip_stops_the_archiver_for_that_store_as_tampering(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    """An entry that does not parse is tampering too: refused as ArchiveTampered (the archiver
    quarantines the session), never a crash that would end the decision in dead letters."""
    archived = fill(archive, photos, 2)
    # Past the signed head (where an archiver that died between its writes leaves the tip).
    raw_put(archive, archive._entry_key("acme", "store-1", archived[-1][1].seq + 1), b"not a chain entry")

    with pytest.raises(ArchiveTampered, match="unreadable"):
        archive.archive(session_at(T0 + timedelta(hours=1), photos))
    assert "altered" in archive.verify("acme", "store-1", *window()).kinds()


def test_a_session_quarantined_beside_a_tampered_chain_is_reported_and_chained_once_the_chain_is_restored(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    fill(archive, photos, 2)
    head_key = f"{archive._chain('acme', 'store-1')}head.json"
    genuine_head = raw_get(archive, head_key)
    document = json.loads(genuine_head)
    document["body"]["seq"] = 1
    raw_put(archive, head_key, json.dumps(document).encode())
    late = session_at(T0 + timedelta(hours=1), photos)
    with pytest.raises(ArchiveTampered) as refused:
        archive.archive(late)

    archive.quarantine(late, str(refused.value))
    report = archive.verify("acme", "store-1", *window())
    assert {"bad_signature", "quarantined"} <= report.kinds() and "unchained" not in report.kinds()
    (held,) = [p for p in report.problems if p.kind == "quarantined"]
    assert held.session_id == late.session_id and "signature" in held.detail
    assert archive.drain_quarantine() == [], "still tampered: it stays where it is"

    raw_put(archive, head_key, genuine_head)  # the operator restores the head from a backup
    assert archive.drain_quarantine() == [late.session_id]
    report = archive.verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert archive.read(archive.session_key("acme", "store-1", late.decided_ms, late.session_id)).frames


def test_verify_detects_an_altered_session(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 6)
    key = archived[2][1].key
    sealed = SealedSession.from_bytes(raw_get(archive, key))
    header = json.loads(sealed.header["decision"]["payload"])
    assert header["decision"] == "approve"
    # Turn the archived approval into a decline: rewrite the header in the clear.
    import msgpack

    forged_header = dict(sealed.header, threshold=0.5)
    sealed.header_bytes = msgpack.packb(forged_header)
    raw_put(archive, key, sealed.to_bytes())

    report = archive.verify("acme", "store-1", *window())
    assert [(p.kind, p.session_id) for p in report.problems] == [("altered", archived[2][0].session_id)]


def test_verify_detects_a_flipped_byte_in_a_frame(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 3)
    key = archived[1][1].key
    sealed = SealedSession.from_bytes(raw_get(archive, key))
    ciphertext = bytearray(sealed.frames[0].sealed)
    ciphertext[100] ^= 1
    sealed.frames[0].sealed = bytes(ciphertext)
    raw_put(archive, key, sealed.to_bytes())

    assert archive.verify("acme", "store-1", *window()).kinds() == {"altered"}


def test_verify_detects_reordered_sessions(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 6)
    first, second = archived[2][1].key, archived[3][1].key
    first_bytes, second_bytes = raw_get(archive, first), raw_get(archive, second)
    raw_put(archive, first, second_bytes)
    raw_put(archive, second, first_bytes)

    report = archive.verify("acme", "store-1", *window())
    assert report.kinds() == {"reordered"}
    assert {p.session_id for p in report.problems} == {archived[2][0].session_id, archived[3][0].session_id}


def test_verify_detects_reordered_chain_entries(archive: ArchiveStore, photos: list[bytes]) -> None:
    fill(archive, photos, 6)
    third, fourth = archive._entry_key("acme", "store-1", 3), archive._entry_key("acme", "store-1", 4)
    third_bytes, fourth_bytes = raw_get(archive, third), raw_get(archive, fourth)
    raw_put(archive, third, fourth_bytes)
    raw_put(archive, fourth, third_bytes)

    assert archive.verify("acme", "store-1", *window()).kinds() == {"reordered"}


def test_a_chain_entry_forged_without_the_archive_key_is_caught(archive: ArchiveStore, photos: list[bytes]) -> None:
    archived = fill(archive, photos, 4)
    key = archive._entry_key("acme", "store-1", 2)
    document = json.loads(raw_get(archive, key))
    document["body"]["decided_ms"] += 1
    raw_put(archive, key, json.dumps(document).encode())

    assert "altered" in archive.verify("acme", "store-1", *window()).kinds()
    assert archived


def test_a_session_slipped_into_the_bucket_is_reported_unchained(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes]
) -> None:
    fill(archive, photos, 3)
    forged = session_at(T0 + timedelta(minutes=3), photos)
    from facepay.archive.container import seal_session

    raw_put(
        archive,
        archive.session_key("acme", "store-1", forged.decided_ms, forged.session_id),
        seal_session(forged, archive.keys).to_bytes(),
    )

    # Just stored, it may be a session an archiver is chaining right now: in flight, not yet a problem.
    fresh = archive.verify("acme", "store-1", *window())
    assert fresh.ok, fresh.problems
    assert [p.session_id for p in fresh.in_flight] == [forged.session_id]
    # Older than the in-flight window (no archiver takes that long), it is unchained.
    report = archive.verify("acme", "store-1", *window(), in_flight=timedelta(0))
    assert [(p.kind, p.session_id) for p in report.problems] == [("unchained", forged.session_id)]
    assert not report.in_flight


def archive_as_it_happens(archive: ArchiveStore, session: ArchivedSession, lag: timedelta = timedelta(seconds=2)):
    """Archive with the archiver's clock at decision time + lag (as a live archiver would)."""
    archive.clock = lambda: session.decided_ms / 1000 + lag.total_seconds()
    return archive.archive(session)


def test_verify_of_a_range_reads_only_around_it(archive: ArchiveStore, photos: list[bytes]) -> None:
    for i in range(30):  # 3.5 hours of sessions
        archive_as_it_happens(archive, session_at(T0 + timedelta(minutes=7 * i), photos, frames=1))
    report = archive.verify(
        "acme", "store-1", T0 + timedelta(hours=2), T0 + timedelta(hours=2, minutes=30), max_lag=timedelta(minutes=5)
    )
    assert report.ok, report.problems
    assert report.checked_sessions == 4
    assert report.checked_entries < 10


def test_a_session_archived_long_after_its_decision_is_verified_through_its_marker(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    late = session_at(T0, photos)
    for i in range(6):
        archive_as_it_happens(archive, session_at(T0 + timedelta(minutes=10 * i + 1), photos, frames=1))
    receipt = archive_as_it_happens(archive, late, lag=timedelta(hours=3))  # after an outage
    for i in range(6, 10):
        archive_as_it_happens(archive, session_at(T0 + timedelta(minutes=10 * i + 181), photos, frames=1))

    in_range = (T0 - timedelta(minutes=5), T0 + timedelta(minutes=30))
    report = archive.verify("acme", "store-1", *in_range, max_lag=timedelta(minutes=30))
    assert report.ok, report.problems
    assert report.checked_sessions == 4

    sealed = SealedSession.from_bytes(raw_get(archive, receipt.key))
    sealed.frames[0].sealed = sealed.frames[0].sealed[:-1] + bytes([sealed.frames[0].sealed[-1] ^ 1])
    raw_put(archive, receipt.key, sealed.to_bytes())
    altered = archive.verify("acme", "store-1", *in_range, max_lag=timedelta(minutes=30))
    assert [(p.kind, p.session_id) for p in altered.problems] == [("altered", late.session_id)]


# --- concurrency -----------------------------------------------------------------------------------


def test_two_replicas_appending_at_once_do_not_fork_the_chain(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]
) -> None:
    prefix = "test-" + uuid.uuid4().hex[:12]
    replicas = [make_store(s3, keys, prefix=prefix) for _ in range(2)]
    sessions = [session_at(T0 + timedelta(seconds=5 * i), photos, frames=1) for i in range(40)]
    receipts: list = []
    errors: list = []

    def run(replica: ArchiveStore, mine: list[ArchivedSession]) -> None:
        try:
            receipts.extend(replica.archive(s) for s in mine)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(replica, sessions[i::2])) for i, replica in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert sorted(r.seq for r in receipts) == list(range(1, 41)), "every session got its own position"
    report = replicas[0].verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert report.checked_sessions == 40
    head, _ = replicas[1]._head("acme", "store-1")
    assert head["seq"] == 40, "the head never moved back"


def test_a_replica_that_found_a_new_chain_headless_goes_on_when_another_replica_starts_it_meanwhile(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]
) -> None:
    """A store's first sessions, archived by two replicas at once: one finds no head (the chain
    is new) and, before it looks for entries, the other creates the head and chains a session.
    Entries next to a head it saw missing are not tampering: the head was made meanwhile."""
    prefix = "test-" + uuid.uuid4().hex[:12]
    first, second = make_store(s3, keys, prefix=prefix), make_store(s3, keys, prefix=prefix)
    entries = f"{first._chain('acme', 'store-1')}entries/"
    paused: list[str] = []

    def the_other_replica_chains_a_session_meanwhile(params: dict, **_: object) -> None:
        # `first` is about to list the entries of a chain whose head it found missing (no StartAfter).
        if params.get("Prefix") == entries and "StartAfter" not in params and not paused:
            paused.append(second.archive(session_at(T0, photos)).key)

    first.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", the_other_replica_chains_a_session_meanwhile
    )
    receipt = first.archive(session_at(T0 + timedelta(minutes=1), photos))

    assert paused, "the other replica chained its session inside the window"
    assert receipt.seq == 2
    report = second.verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert report.checked_sessions == 2


def test_a_chain_head_removed_beside_its_entries_stops_the_archiver(archive: ArchiveStore, photos: list[bytes]) -> None:
    """Removing only the head (every entry and session left) is still tampering, whoever looks twice."""
    fill(archive, photos, 3)
    archive.client.delete_object(Bucket=archive.bucket, Key=f"{archive._chain('acme', 'store-1')}head.json")

    with pytest.raises(ArchiveTampered, match="no head"):
        archive.archive(session_at(T0 + timedelta(hours=1), photos))
    assert archive._entry_seqs("acme", "store-1") == [1, 2, 3], "nothing chained after the cut"
    assert "head_missing" in archive.verify("acme", "store-1", *window()).kinds()


@pytest.mark.parametrize("tampering", ["removed", "forged"])
def test_a_chain_head_tampered_with_while_a_replica_chains_a_session_is_not_put_back(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes], tampering: str
) -> None:
    """The head removed (or overwritten unsigned) in the moment between a replica's append and
    its head advance: writing a head back would erase the evidence. The replica refuses as
    tampering (the archiver quarantines the session), the head stays as the intruder left it,
    verify says so, and the quarantined session stays outside until the chain is restored."""
    fill(archive, photos, 2)
    head_key = f"{archive._chain('acme', 'store-1')}head.json"
    entries = f"{archive._chain('acme', 'store-1')}entries/"
    intruder = make_store(s3, archive.keys, prefix=archive.prefix.rstrip("/"))
    genuine_head = raw_get(intruder, head_key)
    appended: list[str] = []
    tampered: list[str] = []

    def note_the_append(params: dict, **_: object) -> None:
        if str(params.get("Key", "")).startswith(entries):
            appended.append(params["Key"])

    def tamper_before_the_head_moves(params: dict, **_: object) -> None:
        if params.get("Key") == head_key and appended and not tampered:
            if tampering == "removed":
                intruder.client.delete_object(Bucket=intruder.bucket, Key=head_key)
            else:
                document = json.loads(genuine_head)
                document["body"]["seq"] = 9
                raw_put(intruder, head_key, json.dumps(document).encode())
            tampered.append(head_key)

    archive.client.meta.events.register("before-parameter-build.s3.PutObject", note_the_append)
    archive.client.meta.events.register("before-parameter-build.s3.GetObject", tamper_before_the_head_moves)
    late = session_at(T0 + timedelta(hours=1), photos)
    with pytest.raises(ArchiveTampered, match="vanished" if tampering == "removed" else "signature") as refused:
        archive.archive(late)

    assert tampered, "the head was tampered with between the append and the head advance"
    head, etag = intruder._head("acme", "store-1")
    assert head is None and (etag is None) == (tampering == "removed"), "the head is as the intruder left it"
    archive.quarantine(late, str(refused.value))  # what the archiver does with ArchiveTampered
    report = intruder.verify("acme", "store-1", *window())
    assert {"head_missing" if tampering == "removed" else "bad_signature", "quarantined"} <= report.kinds()
    assert intruder.drain_quarantine() == [], "still tampered: it stays where it is"
    assert intruder._head("acme", "store-1")[1] == etag, "draining did not put a head back either"

    raw_put(intruder, head_key, genuine_head)  # the operator restores the head from a backup
    assert intruder.drain_quarantine() == [late.session_id]
    report = intruder.verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert report.checked_sessions == 3 and intruder._head("acme", "store-1")[0]["seq"] == 3


# --- a live archive: verify while archivers append ------------------------------------------------------


def test_verify_while_a_replica_appends_does_not_take_the_moving_head_for_a_cut(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]
) -> None:
    """An auditor verifies while an archiver chains a session between verify's listing of the
    entries and its reading of the head: the head is past the listing, and the chain is whole."""
    prefix = "test-" + uuid.uuid4().hex[:12]
    replica, auditor = make_store(s3, keys, prefix=prefix), make_store(s3, keys, prefix=prefix)
    fill(replica, photos, 3)
    head_key = f"{auditor._chain('acme', 'store-1')}head.json"
    appended: list = []

    def the_replica_chains_a_session_meanwhile(params: dict, **_: object) -> None:
        # The auditor has listed the entries and is about to read the head.
        if params.get("Key") == head_key and not appended:
            appended.append(replica.archive(session_at(T0 + timedelta(hours=1), photos)))

    auditor.client.meta.events.register("before-parameter-build.s3.GetObject", the_replica_chains_a_session_meanwhile)
    report = auditor.verify("acme", "store-1", *window())

    assert [r.seq for r in appended] == [4], "the replica chained a session inside the window"
    assert report.ok, report.problems
    assert (report.checked_sessions, report.checked_entries) == (4, 4)


def test_verify_while_a_replica_chains_a_session_reports_it_in_flight_not_unchained(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes]
) -> None:
    """An auditor verifies between a replica's storing of a session and its chaining of it: the
    session is in flight (listed as such), not a problem; once chained it verifies."""
    prefix = "test-" + uuid.uuid4().hex[:12]
    replica, auditor = make_store(s3, keys, prefix=prefix), make_store(s3, keys, prefix=prefix)
    fill(replica, photos, 2)
    entries = f"{replica._chain('acme', 'store-1')}entries/"
    during: list = []

    def the_auditor_verifies_meanwhile(params: dict, **_: object) -> None:
        # The replica stored the session and is about to write its chain entry.
        if str(params.get("Key", "")).startswith(entries) and not during:
            during.append(auditor.verify("acme", "store-1", *window()))

    replica.client.meta.events.register("before-parameter-build.s3.PutObject", the_auditor_verifies_meanwhile)
    session = session_at(T0 + timedelta(hours=1), photos)
    replica.archive(session)

    (report,) = during
    assert report.ok, report.problems
    assert [p.session_id for p in report.in_flight] == [session.session_id]
    after = auditor.verify("acme", "store-1", *window())
    assert after.ok, after.problems
    assert not after.in_flight and after.checked_sessions == 3


# --- retention -------------------------------------------------------------------------------------------


def test_the_retention_sweep_deletes_old_sessions_and_the_chain_still_verifies(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    old = [archive.archive(session_at(T0 - timedelta(days=100, minutes=-i), photos)) for i in range(3)]
    recent = [archive.archive(session_at(T0 - timedelta(days=10, minutes=-i), photos)) for i in range(3)]

    report = archive.sweep(now=T0)  # default: 90 days
    assert report.deleted_sessions == 3
    assert archive.list_sessions("acme", "store-1", T0 - timedelta(days=101), T0 - timedelta(days=99)) == []
    assert len(archive.list_sessions("acme", "store-1", T0 - timedelta(days=11), T0)) == 3
    assert all(archive.read(r.key).frames for r in recent)

    verified = archive.verify("acme", "store-1", T0 - timedelta(days=120), T0)
    assert verified.ok, verified.problems
    assert verified.checked_sessions == 3
    assert old


def test_after_a_sweep_new_sessions_chain_on(archive: ArchiveStore, photos: list[bytes]) -> None:
    for i in range(3):
        archive.archive(session_at(T0 - timedelta(days=100, minutes=-i), photos))
    archive.sweep(now=T0)
    receipt = archive.archive(session_at(T0, photos))
    assert receipt.seq == 4
    assert archive.verify("acme", "store-1", T0 - timedelta(days=120), T0 + timedelta(hours=1)).ok


def test_a_session_removed_by_hand_is_not_mistaken_for_expiry(archive: ArchiveStore, photos: list[bytes]) -> None:
    for i in range(2):
        archive.archive(session_at(T0 - timedelta(days=100, minutes=-i), photos))
    young = [archive.archive(session_at(T0 - timedelta(days=5, minutes=-i), photos)) for i in range(3)]
    archive.sweep(now=T0)
    archive.client.delete_object(Bucket=archive.bucket, Key=young[1].key)
    assert archive.verify("acme", "store-1", T0 - timedelta(days=120), T0).kinds() == {"removed"}


# --- erasure ---------------------------------------------------------------------------------------------


def test_erasing_a_user_removes_their_frames_and_keeps_the_audit_trail(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    alice = [archive.archive(session_at(T0 + timedelta(minutes=i), photos, user="alice")) for i in range(2)]
    bob = archive.archive(session_at(T0 + timedelta(minutes=5), photos, user="bob"))
    declined = archive.archive(session_at(T0 + timedelta(minutes=6), photos, user=None))

    erased = archive.erase_user("acme", "alice")
    assert sorted(erased) == sorted(r.key for r in alice)
    for receipt in alice:
        back = archive.read(receipt.key)
        assert back.frames == [] and back.user_id == "alice", "frames gone; signed decision kept"
        stored = raw_get(archive, receipt.key)
        assert photos[0][200:264] not in stored
    assert archive.read(bob.key).frames and archive.read(declined.key).frames

    report = archive.verify("acme", "store-1", *window())
    assert report.ok, report.problems
    assert report.erased == 2
    assert archive.erase_user("acme", "alice") == [], "idempotent"


def test_frames_removed_without_a_signed_erasure_note_are_caught(archive: ArchiveStore, photos: list[bytes]) -> None:
    receipt = fill(archive, photos, 2)[0][1]
    sealed = SealedSession.from_bytes(raw_get(archive, receipt.key))
    sealed.frames[1].sealed = None
    raw_put(archive, receipt.key, sealed.to_bytes())
    assert archive.verify("acme", "store-1", *window()).kinds() == {"altered"}


# --- outage --------------------------------------------------------------------------------------------------


def test_while_the_object_store_is_down_writes_fail_retryably_and_succeed_after_restart(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes]
) -> None:
    before = archive.archive(session_at(T0, photos))
    s3.kill()
    try:
        pending = session_at(T0 + timedelta(minutes=1), photos)
        started = time.monotonic()
        with pytest.raises(ArchiveUnavailable) as down:
            archive.archive(pending)
        assert down.value.retryable
        assert time.monotonic() - started < 30, (
            "an outage surfaces quickly, so the archiver falls behind instead of hanging"
        )
    finally:
        s3.start()

    receipt = _retry(lambda: archive.archive(pending))
    assert receipt.seq == 2
    assert archive.read(before.key).frames[0].image == photos[0]
    assert archive.verify("acme", "store-1", *window()).ok


def test_an_archive_killed_and_restarted_mid_stream_loses_no_session(
    s3: EmbeddedS3, archive: ArchiveStore, photos: list[bytes]
) -> None:
    sessions = [session_at(T0 + timedelta(minutes=i), photos, frames=2) for i in range(30)]
    receipts: list = []
    archiver = threading.Thread(
        target=lambda: receipts.extend(_retry(lambda s=s: archive.archive(s)) for s in sessions)
    )
    archiver.start()
    _wait_until(lambda: len(receipts) >= 8)
    s3.kill()
    time.sleep(0.5)  # the archiver keeps trying against a dead server meanwhile
    s3.start()
    archiver.join(120)

    assert len(receipts) == 30
    assert len(archive.list_sessions("acme", "store-1", *window())) == 30
    assert sorted(r.seq for r in receipts) == list(range(1, 31)), "one chain position per session, none twice"
    report = archive.verify("acme", "store-1", *window())
    assert report.ok and report.checked_sessions == 30, report.problems


def test_a_session_stored_but_not_chained_by_a_dead_archiver_is_chained_on_redelivery(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    from facepay.archive.container import seal_session

    archive.archive(session_at(T0, photos))
    orphan = session_at(T0 + timedelta(minutes=1), photos)
    stored = seal_session(orphan, archive.keys)
    archive._put_if_absent(
        archive.session_key("acme", "store-1", orphan.decided_ms, orphan.session_id), stored.to_bytes()
    )
    # Past the in-flight window (the dead archiver's session not yet taken over): unchained.
    assert archive.verify("acme", "store-1", *window(), in_flight=timedelta(0)).kinds() == {"unchained"}

    receipt = archive.archive(orphan)  # the redelivered session
    assert receipt.seq == 2 and receipt.content_sha256 == stored.content_sha256()
    assert archive.verify("acme", "store-1", *window()).ok


def test_a_chained_session_whose_marker_was_lost_is_not_chained_twice(
    archive: ArchiveStore, photos: list[bytes]
) -> None:
    """An archiver whose chain append succeeded but whose reply was lost (server killed) retries."""
    session = session_at(T0, photos)
    first = archive.archive(session)
    archive.client.delete_object(
        Bucket=archive.bucket, Key=f"{archive._chain('acme', 'store-1')}archived/{session.session_id}.json"
    )

    again = archive.archive(session)
    assert again.already_archived and again.seq == first.seq
    assert archive._entry_seqs("acme", "store-1") == [1]


def _wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _retry(action, timeout_s: float = 60.0):
    """What the archiver does: retry a retryable failure until the store is back."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return action()
        except ArchiveUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_credentials_come_from_the_environment_or_a_credentials_file(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"{s3.url}/facepay-archive/test-{uuid.uuid4().hex[:12]}"
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials.secret_access_key)
    assert ArchiveStore(ArchiveSettings.from_url(url), keys).archive(session_at(T0, photos)).seq == 1

    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {s3.credentials.access_key_id}\n"
        f"aws_secret_access_key = {s3.credentials.secret_access_key}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    assert (
        ArchiveStore(ArchiveSettings.from_url(url), keys).archive(session_at(T0 + timedelta(minutes=1), photos)).seq
        == 2
    )


def test_settings_come_from_the_environment_without_credentials_in_the_url(tmp_path: Path) -> None:
    settings = ArchiveSettings.from_env(
        {"FACEPAY_ARCHIVE_URL": "http://127.0.0.1:8333/audit/prod", "FACEPAY_ARCHIVE_KEYS_FILE": "/k"}
    )
    assert (settings.endpoint_url, settings.bucket, settings.prefix, settings.retention_days) == (
        "http://127.0.0.1:8333",
        "audit",
        "prod/",
        90,
    )
    assert ArchiveSettings.from_url("s3://audit").endpoint_url is None
    with pytest.raises(ValueError, match="credentials"):
        ArchiveSettings.from_url("http://key:secret@127.0.0.1:8333/audit")
    keys_file = tmp_path / "keys.yaml"
    ArchiveKeys.generate(["acme"]).write(keys_file)
    assert ArchiveKeys.from_file(keys_file).tenants["acme"].current == "k1"
    keys_file.chmod(0o644)
    with pytest.raises(ArchiveKeyError, match="readable by others"):
        ArchiveKeys.from_file(keys_file)


def test_a_keys_file_readable_by_its_own_group_only_is_accepted_as_kubernetes_mounts_it(tmp_path: Path) -> None:
    """A Secret volume with the pod's fsGroup is root:<fsGroup> 0440: readable by the process's
    own group, by no one else. Group-writable, world-readable or another group's: refused."""
    keys_file = tmp_path / "keys.yaml"
    ArchiveKeys.generate(["acme"]).write(keys_file)
    os.chown(keys_file, -1, os.getgid())
    for mode in (0o440, 0o640):
        keys_file.chmod(mode)
        assert ArchiveKeys.from_file(keys_file).tenants["acme"].current == "k1"
    for mode in (0o660, 0o604, 0o444):
        keys_file.chmod(mode)
        with pytest.raises(ArchiveKeyError, match=r"readable by others|writable"):
            ArchiveKeys.from_file(keys_file)


def test_each_store_reads_the_credentials_the_environment_has_when_it_is_made(
    s3: EmbeddedS3, keys: ArchiveKeys, photos: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the first ones a process ever saw (boto3's default session caches them)."""
    url = f"{s3.url}/facepay-archive/test-{uuid.uuid4().hex[:12]}"
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FPOLDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-away")
    ArchiveStore(ArchiveSettings.from_url(url), keys)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials.secret_access_key)
    assert ArchiveStore(ArchiveSettings.from_url(url), keys).archive(session_at(T0, photos)).seq == 1


def test_two_archivers_making_a_new_bucket_at_once_both_go_on(s3: EmbeddedS3, keys: ArchiveKeys) -> None:
    """A sees no bucket; B creates it before A does: A's create must not fail (the race of two
    archiver replicas, or the demo and its archiver, on a fresh store)."""
    from botocore.exceptions import ClientError

    bucket = f"race-{uuid.uuid4().hex[:10]}"
    a, b = (
        ArchiveStore(
            ArchiveSettings.from_url(f"{s3.url}/{bucket}"),
            keys,
            access_key_id=s3.credentials.access_key_id,
            secret_access_key=s3.credentials.secret_access_key,
        )
        for _ in range(2)
    )
    with pytest.raises(ClientError) as missing:
        a.client.head_bucket(Bucket=bucket)

    def head_then_the_other_creates_it(**kwargs):
        b.ensure_bucket()
        raise missing.value

    a.client.head_bucket = head_then_the_other_creates_it
    a.ensure_bucket()
    b.client.head_bucket(Bucket=bucket)  # there, once
