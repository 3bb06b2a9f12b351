"""The gallery at scale: tuning settings, the embedded index built off the payment path, and the
Qdrant-server backend's cluster layout and bounded retries. Small sizes; the 1 M figures come
from bench/gallery.py (README "Measured")."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import facepay.gallery.edge as edge
from facepay.config import QdrantTuning, Settings, SettingsError, load_settings
from facepay.gallery import EdgeGallery, GalleryUnavailableError, QdrantGallery, Template, open_gallery
from facepay.gallery.qdrant_server import collection_config, is_transient

MODEL = "dlib-resnet-v1"
DIM = 32
# An index is built past 1 KB of vectors, so a few thousand points exercise the HNSW build.
SMALL_INDEX = QdrantTuning(indexing_threshold_kb=1, full_scan_threshold_kb=1, hnsw_ef_construct=100)


def templates(rng: np.random.Generator, n: int, start: int = 0, tenant: str = "t1") -> list[Template]:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [Template(f"u{start + i}", v[i], tenant=tenant, phone_suffix=f"{i % 100:04d}") for i in range(n)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(14)


# -- settings ------------------------------------------------------------------------------------


def test_qdrant_settings_are_bounded_and_read_from_the_environment() -> None:
    settings = load_settings(
        {
            "FACEPAY_QDRANT_HNSW_M": "24",
            "FACEPAY_QDRANT_REPLICATION_FACTOR": "3",
            "FACEPAY_QDRANT_WRITE_CONSISTENCY_FACTOR": "2",
        }
    )
    assert settings.qdrant.hnsw_m == 24 and settings.qdrant.replication_factor == 3
    with pytest.raises(SettingsError, match=r"qdrant\.hnsw_m"):
        Settings(qdrant=QdrantTuning(hnsw_m=2))
    with pytest.raises(SettingsError, match=r"qdrant\.quantization"):
        Settings(qdrant=QdrantTuning(quantization="int4"))
    with pytest.raises(SettingsError, match=r"qdrant\.write_consistency_factor"):
        Settings(qdrant=QdrantTuning(replication_factor=2, write_consistency_factor=3))


# -- the embedded engine ---------------------------------------------------------------------------


def test_an_edge_shard_is_created_with_the_tuning(tmp_path: Path) -> None:
    tuning = QdrantTuning(hnsw_m=12, hnsw_ef_construct=80, indexing_threads=1)
    with open_gallery(f"edge://{tmp_path}", tuning=tuning) as g:
        g.ensure_collection(MODEL, DIM)
    config = json.loads((tmp_path / "faces__dlib-resnet-v1" / "edge_config.json").read_text())
    text = json.dumps(config)
    assert config["hnsw_config"]["m"] == 12 and config["hnsw_config"]["ef_construct"] == 80
    assert config["hnsw_config"]["payload_m"] == 0 and config["hnsw_config"]["max_indexing_threads"] == 1
    assert "int8" in text.lower()  # scalar quantization of the vectors


def test_the_index_is_built_without_stalling_searches(tmp_path: Path, rng) -> None:
    """qdrant-edge's optimize holds the GIL for the whole build; in the owner's process it would
    freeze every payment search (seen: a 30k build froze a Python thread for 42 s)."""
    with EdgeGallery(tmp_path, tuning=SMALL_INDEX) as g:
        g.ensure_collection(MODEL, DIM)
        items = templates(rng, 2000)
        g.upsert(MODEL, items)
        gaps: list[float] = []
        searched = threading.Event()
        done = threading.Event()

        def search_meanwhile() -> None:
            last = time.perf_counter()
            while not done.is_set():
                assert g.search(MODEL, items[7].vector, tenant="t1")[0].user_id == "u7"
                searched.set()
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        searcher = threading.Thread(target=search_meanwhile)
        searcher.start()
        searched.wait(10)
        started = time.perf_counter()
        assert g.optimize(MODEL) is True
        build_s = time.perf_counter() - started
        done.set()
        searcher.join()
        # Relative to the build, as the machine may be busy: in-process, the build froze searches for all of it.
        assert len(gaps) > 10 and max(gaps) < build_s / 4, (build_s, max(gaps))
        assert g.count(MODEL) == 2000


def test_a_bulk_enrollment_does_not_stall_searches(tmp_path: Path, rng) -> None:
    """qdrant-edge holds the GIL while it applies one update: a 10k-point write froze every
    other thread for seconds; the gallery writes in chunks of qdrant.upsert_batch."""
    with EdgeGallery(tmp_path, tuning=QdrantTuning(upsert_batch=256)) as g:
        g.ensure_collection(MODEL, DIM)
        seed = templates(rng, 100)
        g.upsert(MODEL, seed)
        bulk = templates(rng, 20_000, start=1000, tenant="t2")
        gaps: list[float] = []
        done = threading.Event()

        def search_meanwhile() -> None:
            last = time.perf_counter()
            while not done.is_set():
                assert g.search(MODEL, seed[7].vector, tenant="t1")[0].user_id == "u7"
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        searcher = threading.Thread(target=search_meanwhile)
        searcher.start()
        started = time.perf_counter()
        g.upsert(MODEL, bulk)
        write_s = time.perf_counter() - started
        done.set()
        searcher.join()
        assert g.count(MODEL) == 20_100
        # Relative to the write, as the machine may be busy: one update froze searches for all of it.
        assert len(gaps) > 20 and max(gaps) < write_s / 4, (write_s, max(gaps))


def test_writes_made_during_a_build_are_kept(tmp_path: Path, rng, monkeypatch: pytest.MonkeyPatch) -> None:
    g = EdgeGallery(tmp_path, tuning=SMALL_INDEX)
    g.ensure_collection(MODEL, DIM)
    first, late = templates(rng, 1500), templates(rng, 20, start=5000, tenant="t2")
    g.upsert(MODEL, first)
    real_build = edge._build_in_child

    def build_while_enrolling(shard_dir: Path) -> bool:
        g.upsert(MODEL, late)  # an enrollment and a deletion land while the copy is being built
        assert g.delete_user(MODEL, "u3") == 1
        return real_build(shard_dir)

    monkeypatch.setattr(edge, "_build_in_child", build_while_enrolling)
    assert g.optimize(MODEL) is True
    assert g.count(MODEL) == 1500 + 20 - 1
    assert g.search(MODEL, late[4].vector, tenant="t2")[0].user_id == "u5004"
    g.close()
    current = (tmp_path / "faces__dlib-resnet-v1.current").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current, "faces__dlib-resnet-v1.current"])
    with EdgeGallery(tmp_path) as again:  # a restart opens the built shard, with every write
        assert again.count(MODEL) == 1519
        assert again.search(MODEL, late[4].vector)[0].user_id == "u5004"
        assert again.describe_user(MODEL, "u3") == []


def test_a_failed_build_leaves_the_gallery_as_it_was(tmp_path: Path, rng, monkeypatch: pytest.MonkeyPatch) -> None:
    with EdgeGallery(tmp_path, tuning=SMALL_INDEX) as g:
        g.ensure_collection(MODEL, DIM)
        items = templates(rng, 300)
        g.upsert(MODEL, items)
        monkeypatch.setattr(edge.sys, "executable", "/bin/false")
        with pytest.raises(edge.GalleryError, match="index build"):
            g.optimize(MODEL)
        g.upsert(MODEL, templates(rng, 1, start=900))
        assert g.count(MODEL) == 301 and g.search(MODEL, items[5].vector)[0].user_id == "u5"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["faces__dlib-resnet-v1"]


# -- the Qdrant server backend ---------------------------------------------------------------------


def test_server_collections_are_created_for_a_cluster() -> None:
    """What create_collection is asked for (no Qdrant server or cluster can run here)."""
    tuning = QdrantTuning(shard_number=6, replication_factor=3, write_consistency_factor=2, hnsw_m=20)
    config = collection_config("faces__m", 128, tuning)
    assert (config["shard_number"], config["replication_factor"], config["write_consistency_factor"]) == (6, 3, 2)
    assert config["vectors_config"].on_disk is True and config["on_disk_payload"] is True
    assert config["quantization_config"].scalar.always_ram is True
    assert config["hnsw_config"].m == 20 and config["hnsw_config"].payload_m == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_a_server_that_is_away_is_retried_then_named(caplog: pytest.LogCaptureFixture) -> None:
    port = _closed_port()
    tuning = QdrantTuning(retries=2, retry_backoff_s=0.05, timeout_s=1)
    g = QdrantGallery(url=f"http://127.0.0.1:{port}", tuning=tuning)
    started = time.monotonic()
    with pytest.raises(GalleryUnavailableError, match=rf"127.0.0.1:{port}.*after 3 attempts"):
        g.ensure_collection(MODEL, DIM)
    assert 0.15 <= time.monotonic() - started < 5  # waited 0.05 + 0.1 s between the attempts, no more
    assert sum("retrying" in r.message for r in caplog.records) == 2
    g.close()


def test_a_node_that_drops_connections_is_retried_a_bounded_number_of_times() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []

    def drop_every_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.recv(65536)
            conn.close()  # the request arrives, the node goes away before answering

    threading.Thread(target=drop_every_connection, daemon=True).start()
    g = QdrantGallery(
        url=f"http://127.0.0.1:{listener.getsockname()[1]}",
        tuning=QdrantTuning(retries=3, retry_backoff_s=0.01, timeout_s=2),
        check_compatibility=False,
    )  # no version request of its own on connecting
    try:
        with pytest.raises(GalleryUnavailableError, match="after 4 attempts"):
            g.count(MODEL)
        assert len(accepted) == 4
    finally:
        g.close()
        listener.close()


def test_only_transient_failures_are_retried() -> None:
    from qdrant_client.http.exceptions import UnexpectedResponse

    def answer(status: int) -> UnexpectedResponse:
        return UnexpectedResponse(status_code=status, reason_phrase="", content=b"", headers={})

    assert is_transient(answer(503)) and is_transient(answer(502)) and is_transient(ConnectionError())
    assert not is_transient(answer(400)) and not is_transient(answer(404)) and not is_transient(ValueError())


def test_a_build_left_unfinished_is_removed_on_the_next_open(tmp_path: Path, rng) -> None:
    with EdgeGallery(tmp_path, tuning=SMALL_INDEX) as g:
        g.ensure_collection(MODEL, DIM)
        g.upsert(MODEL, templates(rng, 10))
    (tmp_path / "faces__dlib-resnet-v1@123").mkdir()  # the owner stopped while a copy was being built
    with EdgeGallery(tmp_path) as g:
        assert g.count(MODEL) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces__dlib-resnet-v1"]
