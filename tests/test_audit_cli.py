"""`facepay audit list|verify`, run as the operator runs it (a subprocess of the real CLI),
against the embedded SeaweedFS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facepay.app.audit import AuditError, parse_time
from facepay.archive import ArchiveKeys, ArchiveSettings, ArchiveStore, EmbeddedS3
from tests.test_archive_store import session_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedS3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture(scope="module")
def photos(astronaut) -> list[bytes]:
    import cv2

    return [cv2.imencode(".jpg", cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))[1].tobytes()]


@pytest.fixture
def archive(s3, tmp_path: Path):
    keys_file = tmp_path / "archive-keys.yaml"
    ArchiveKeys.generate(["acme"]).write(keys_file)
    url = f"{s3.url}/facepay-archive/cli-{uuid.uuid4().hex[:8]}"
    store = ArchiveStore(
        ArchiveSettings.from_url(url),
        ArchiveKeys.from_file(keys_file),
        access_key_id=s3.credentials.access_key_id,
        secret_access_key=s3.credentials.secret_access_key,
    )
    store.ensure_bucket()
    env = {
        **os.environ,
        "FACEPAY_ARCHIVE_URL": url,
        "FACEPAY_ARCHIVE_KEYS_FILE": str(keys_file),
        "AWS_ACCESS_KEY_ID": s3.credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3.credentials.secret_access_key,
    }
    return store, env


def facepay(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facepay", "audit", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_list_shows_the_sessions_of_a_store_in_a_range_and_verify_passes_an_untouched_archive(archive, photos):
    store, env = archive
    now = datetime.now(UTC)
    inside = [store.archive(session_at(now - timedelta(hours=h), photos)) for h in (3, 2, 1)]
    store.archive(session_at(now - timedelta(days=3), photos))  # outside the default 24 h
    store.archive(session_at(now - timedelta(hours=2), photos, store="store-2"))

    listed = facepay(env, "list", "--store", "store-1", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [s["key"] for s in json.loads(listed.stdout)] == [r.key for r in inside]
    assert json.loads(listed.stdout)[0]["decision"] == "approve"

    verified = facepay(env, "verify", "--from", "7d")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "acme/store-1: OK" in verified.stdout and "acme/store-2: OK" in verified.stdout


def test_verify_exits_1_and_names_a_removed_session(archive, photos):
    store, env = archive
    now = datetime.now(UTC)
    receipts = [store.archive(session_at(now - timedelta(hours=h), photos)) for h in (3, 2, 1)]
    store.client.delete_object(Bucket=store.bucket, Key=receipts[1].key)

    verified = facepay(env, "verify", "--store", "store-1", "--json")
    assert verified.returncode == 1
    (report,) = json.loads(verified.stdout)
    assert {p["kind"] for p in report["problems"]} == {"removed"}


def test_verify_names_each_session_quarantined_beside_a_tampered_chain(archive, photos):
    from facepay.archive import ArchiveTampered

    store, env = archive
    now = datetime.now(UTC)
    store.archive(session_at(now - timedelta(hours=2), photos))
    head_key = f"{store._chain('acme', 'store-1')}head.json"
    store.client.put_object(Bucket=store.bucket, Key=head_key, Body=b'{"body": {"seq": 9}, "sig": "00"}')
    held = session_at(now - timedelta(hours=1), photos)
    with pytest.raises(ArchiveTampered) as refused:
        store.archive(held)
    store.quarantine(held, str(refused.value))

    verified = facepay(env, "verify", "--store", "store-1")
    assert verified.returncode == 1
    assert f"quarantined: session {held.session_id}: " in verified.stdout and "bad signature" in verified.stdout
    assert "bad_signature: chain head signature does not match" in verified.stdout


def test_verify_run_while_an_archiver_is_chaining_a_session_lists_it_in_flight_and_passes(archive, photos):
    from facepay.archive.container import seal_session

    store, env = archive
    now = datetime.now(UTC)
    store.archive(session_at(now - timedelta(hours=2), photos))
    # What an archiver has done a moment before it chains a session: stored it.
    chaining = session_at(now - timedelta(minutes=1), photos)
    key = store.session_key("acme", "store-1", chaining.decided_ms, chaining.session_id)
    store.client.put_object(Bucket=store.bucket, Key=key, Body=seal_session(chaining, store.keys).to_bytes())

    verified = facepay(env, "verify", "--store", "store-1")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "acme/store-1: OK" in verified.stdout and "1 in flight" in verified.stdout
    assert f"in_flight: session {chaining.session_id}: " in verified.stdout


def test_bad_options_are_a_clear_error_with_exit_2(archive):
    _, env = archive
    bad_time = facepay(env, "verify", "--from", "yesterday")
    assert bad_time.returncode == 2 and "is not a time" in bad_time.stderr
    unknown_store = facepay(env, "list", "--store", "nowhere")
    assert unknown_store.returncode == 2 and "nowhere" in unknown_store.stderr
    no_archive = facepay({k: v for k, v in env.items() if k != "FACEPAY_ARCHIVE_URL"}, "list")
    assert no_archive.returncode == 2 and "FACEPAY_ARCHIVE_URL" in no_archive.stderr


def test_times_are_iso_in_utc_or_relative_to_now():
    now = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
    assert parse_time("-24h", now) == now - timedelta(hours=24)
    assert parse_time("7d", now) == parse_time("-7d", now) == now - timedelta(days=7)
    assert parse_time("2026-11-28T12:00", now) == datetime(2026, 11, 28, 12, tzinfo=UTC)
    with pytest.raises(AuditError):
        parse_time("last week", now)


def test_sweep_deletes_what_is_older_than_the_retention_and_the_chain_still_verifies(archive, photos):
    store, env = archive
    now = datetime.now(UTC)
    store.archive(session_at(now - timedelta(days=100), photos))
    recent = store.archive(session_at(now - timedelta(hours=1), photos))

    swept = facepay(env, "sweep")  # FACEPAY_ARCHIVE_RETENTION_DAYS: 90 by default
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["deleted_sessions"] == 1
    listed = facepay(env, "list", "--from", "400d", "--json")
    assert [s["key"] for s in json.loads(listed.stdout)] == [recent.key]
    assert facepay(env, "verify", "--from", "400d").returncode == 0


def test_erase_drops_the_frames_of_the_sessions_that_approved_the_user_and_keeps_the_decisions(archive, photos):
    store, env = archive
    now = datetime.now(UTC)
    alice = [store.archive(session_at(now - timedelta(hours=h), photos, user="alice")) for h in (3, 2)]
    bob = store.archive(session_at(now - timedelta(hours=1), photos, user="bob"))

    erased = facepay(env, "erase", "--user", "alice")
    assert erased.returncode == 0, erased.stderr
    assert sorted(json.loads(erased.stdout)["erased_sessions"]) == sorted(r.key for r in alice)
    for receipt in alice:
        session = store.read(receipt.key)
        assert session.frames == [] and session.decision.fields["user_id"] == "alice"
    assert len(store.read(bob.key).frames) == 4
    verified = facepay(env, "verify", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)[0]["erased"] == 2
