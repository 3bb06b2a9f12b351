"""The face gallery, specified once and run against both backends (qdrant-client local mode, qdrant-edge)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from facepay.gallery import (
    EdgeGallery,
    Gallery,
    Hit,
    QdrantGallery,
    ShardBusyError,
    Template,
    UnknownModelError,
    collection_name,
    open_gallery,
    point_id,
)

DIM = 128
MODEL = "dlib-resnet-v1"


def unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(rng: np.random.Generator, v: np.ndarray, noise: float) -> np.ndarray:
    w = v + noise * unit(rng, v.shape[0])
    return (w / np.linalg.norm(w)).astype(np.float32)


def mean_t(user: str, v: np.ndarray, tenant: str = "store-1", phone_suffix: str | None = None) -> Template:
    return Template(user_id=user, vector=v, tenant=tenant, kind="mean", phone_suffix=phone_suffix, enrolled_at_ms=1)


def sample_t(user: str, v: np.ndarray, tenant: str = "store-1", phone_suffix: str | None = None) -> Template:
    return Template(user_id=user, vector=v, tenant=tenant, kind="sample", phone_suffix=phone_suffix, enrolled_at_ms=1)


Opener = Callable[[Path], Gallery]
OPENERS: dict[str, Opener] = {
    "qdrant-local": lambda path: QdrantGallery(path=str(path)),
    "edge": lambda path: EdgeGallery(path),
}


@pytest.fixture(params=sorted(OPENERS))
def opener(request: pytest.FixtureRequest) -> Opener:
    return OPENERS[request.param]


@pytest.fixture
def gallery(opener: Opener, tmp_path: Path):
    g = opener(tmp_path / "gallery")
    g.ensure_collection(MODEL, DIM)
    yield g
    g.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def enrolled(gallery: Gallery, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Five users of store-1, each enrolled with a mean template and three samples."""
    users = {f"user-{i}": unit(rng) for i in range(5)}
    templates = []
    for user, v in users.items():
        templates.append(mean_t(user, v))
        templates += [sample_t(user, near(rng, v, 0.3)) for _ in range(3)]
    gallery.upsert(MODEL, templates)
    return users


# -- search -------------------------------------------------------------------------------------


def test_backends_satisfy_the_protocol(gallery: Gallery) -> None:
    assert isinstance(gallery, Gallery)


def test_own_vector_is_found_with_score_about_one(gallery: Gallery, enrolled: dict[str, np.ndarray]) -> None:
    for user, v in enrolled.items():
        hits = gallery.search(MODEL, v)
        assert hits[0].user_id == user
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].tenant == "store-1"
        assert isinstance(hits[0], Hit)


def test_noisy_probe_scores_lower_but_still_matches(gallery, enrolled, rng) -> None:
    user, v = next(iter(enrolled.items()))
    hits = gallery.search(MODEL, near(rng, v, 0.5))
    assert hits[0].user_id == user
    assert 0.6 < hits[0].score < 0.99


def test_unrelated_vector_scores_low(gallery, enrolled, rng) -> None:
    hits = gallery.search(MODEL, unit(rng))
    assert len(hits) == 2
    assert all(h.score < 0.5 for h in hits)


def test_second_best_is_a_different_user_with_a_lower_score(gallery, enrolled) -> None:
    for user, v in enrolled.items():
        best, second = gallery.search(MODEL, v, limit=2)
        assert best.user_id == user
        assert second.user_id != user
        assert second.score < best.score


def test_search_returns_distinct_users_when_one_user_has_many_close_samples(gallery, rng) -> None:
    a, b, c = unit(rng), unit(rng), unit(rng)
    # 40 samples of "a" all closer to the probe than anything of "b" or "c".
    gallery.upsert(MODEL, [mean_t("a", a)] + [sample_t("a", near(rng, a, 0.05)) for _ in range(40)])
    gallery.upsert(MODEL, [mean_t("b", near(rng, a, 2.0)), sample_t("b", b), mean_t("c", c), sample_t("c", c)])
    for kind in ("sample", None):
        hits = gallery.search(MODEL, a, limit=3, kind=kind)
        users = [h.user_id for h in hits]
        assert users[0] == "a"
        assert len(users) == len(set(users)) == 3
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_uses_mean_templates_by_default(gallery, rng) -> None:
    v = unit(rng)
    gallery.upsert(MODEL, [sample_t("only-samples", v)])
    assert all(h.user_id != "only-samples" for h in gallery.search(MODEL, v))
    assert gallery.search(MODEL, v, kind="sample")[0].user_id == "only-samples"


def test_limit_larger_than_the_gallery_returns_every_user_once(gallery, enrolled) -> None:
    hits = gallery.search(MODEL, next(iter(enrolled.values())), limit=50)
    assert sorted(h.user_id for h in hits) == sorted(enrolled)


def test_empty_collection_returns_no_hits(gallery, rng) -> None:
    assert gallery.search(MODEL, unit(rng)) == []


# -- filters ------------------------------------------------------------------------------------


def test_tenant_filter_excludes_other_tenants_users(gallery, enrolled, rng) -> None:
    other = unit(rng)
    gallery.upsert(MODEL, [mean_t("elsewhere", other, tenant="store-2")])
    assert gallery.search(MODEL, other)[0].user_id == "elsewhere"

    hits = gallery.search(MODEL, other, limit=10, tenant="store-1")
    assert "elsewhere" not in {h.user_id for h in hits}
    assert {h.tenant for h in hits} == {"store-1"}
    assert [h.user_id for h in gallery.search(MODEL, other, limit=10, tenant="store-2")] == ["elsewhere"]


def test_phone_suffix_filter_excludes_users_with_another_suffix(gallery, rng) -> None:
    v1, v2 = unit(rng), unit(rng)
    gallery.upsert(MODEL, [mean_t("alice", v1, phone_suffix="1234"), mean_t("bob", v2, phone_suffix="5678")])
    assert [h.user_id for h in gallery.search(MODEL, v2, limit=5, phone_suffix="1234")] == ["alice"]
    assert [h.user_id for h in gallery.search(MODEL, v2, limit=5, phone_suffix="5678")] == ["bob"]
    assert gallery.search(MODEL, v2, limit=5, phone_suffix="0000") == []


def test_list_users_and_count(gallery, enrolled, rng) -> None:
    gallery.upsert(MODEL, [mean_t("elsewhere", unit(rng), tenant="store-2")])
    assert gallery.list_users(MODEL) == sorted([*enrolled, "elsewhere"])
    assert gallery.list_users(MODEL, tenant="store-1") == sorted(enrolled)
    assert gallery.list_users(MODEL, tenant="store-2") == ["elsewhere"]
    assert gallery.list_users(MODEL, tenant="nowhere") == []
    assert gallery.count(MODEL) == 5 * 4 + 1  # points: a mean and three samples per user


# -- writes -------------------------------------------------------------------------------------


def test_delete_user_removes_every_template_and_is_idempotent(gallery, enrolled) -> None:
    user, v = next(iter(enrolled.items()))
    before = gallery.count(MODEL)
    assert gallery.delete_user(MODEL, user) == 4  # mean + 3 samples
    assert gallery.count(MODEL) == before - 4
    assert gallery.delete_user(MODEL, user) == 0
    assert gallery.delete_user(MODEL, "never-enrolled") == 0
    assert user not in gallery.list_users(MODEL)
    for kind in ("mean", "sample", None):
        assert user not in {h.user_id for h in gallery.search(MODEL, v, limit=10, kind=kind)}


def test_reupserting_a_user_overwrites_instead_of_duplicating(gallery, enrolled, rng) -> None:
    user = next(iter(enrolled))
    before = gallery.count(MODEL)
    fresh = unit(rng)
    gallery.upsert(MODEL, [mean_t(user, fresh)] + [sample_t(user, near(rng, fresh, 0.3)) for _ in range(3)])
    gallery.upsert(MODEL, [mean_t(user, fresh)])
    assert gallery.count(MODEL) == before
    assert gallery.list_users(MODEL).count(user) == 1
    best = gallery.search(MODEL, fresh)[0]
    assert best.user_id == user and best.score == pytest.approx(1.0, abs=1e-4)


def test_empty_upsert_is_a_no_op(gallery) -> None:
    gallery.upsert(MODEL, [])
    assert gallery.count(MODEL) == 0


@pytest.mark.parametrize("dim", [64, 129])
def test_wrong_dimension_raises_value_error(gallery, enrolled, rng, dim) -> None:
    with pytest.raises(ValueError, match="dimension"):
        gallery.upsert(MODEL, [mean_t("wrong", unit(rng, dim))])
    with pytest.raises(ValueError, match="dimension"):
        gallery.search(MODEL, unit(rng, dim))
    with pytest.raises(ValueError, match=f"{DIM}-d"):
        gallery.ensure_collection(MODEL, dim)
    assert "wrong" not in gallery.list_users(MODEL)


def test_a_bad_template_rejects_the_whole_batch(gallery, rng) -> None:
    with pytest.raises(ValueError):
        gallery.upsert(MODEL, [mean_t("ok", unit(rng)), mean_t("bad", unit(rng, 3))])
    with pytest.raises(ValueError, match="kind"):
        gallery.upsert(MODEL, [Template("x", unit(rng), "store-1", kind="avg")])
    with pytest.raises(ValueError, match="zeros"):
        gallery.upsert(MODEL, [mean_t("zero", np.zeros(DIM, np.float32))])
    assert gallery.count(MODEL) == 0


def test_ensure_collection_is_idempotent(gallery, enrolled) -> None:
    gallery.ensure_collection(MODEL, DIM)
    assert gallery.count(MODEL) == 20


def test_two_model_ids_never_mix(gallery, enrolled, rng) -> None:
    other_model = "arcface-r100"
    gallery.ensure_collection(other_model, DIM)  # same dimension: only the collection keeps them apart
    v = unit(rng)
    gallery.upsert(other_model, [mean_t("arc-user", v)])
    assert gallery.list_users(other_model) == ["arc-user"]
    assert gallery.count(other_model) == 1
    assert "arc-user" not in gallery.list_users(MODEL)
    assert all(h.user_id != "arc-user" for h in gallery.search(MODEL, v, limit=10))
    some_user, some_v = next(iter(enrolled.items()))
    assert [h.user_id for h in gallery.search(other_model, some_v, limit=10)] == ["arc-user"]
    # A third model of another dimension lives beside them.
    gallery.ensure_collection("arcface-512", 512)
    gallery.upsert("arcface-512", [mean_t(some_user, unit(rng, 512))])
    assert gallery.count("arcface-512") == 1 and gallery.count(MODEL) == 20
    assert gallery.delete_user("arcface-512", some_user) == 1
    assert some_user in gallery.list_users(MODEL)


def test_unknown_model(gallery, rng) -> None:
    with pytest.raises(UnknownModelError):
        gallery.search("never-created", unit(rng))
    with pytest.raises(UnknownModelError):
        gallery.upsert("never-created", [mean_t("a", unit(rng))])
    assert gallery.count("never-created") == 0
    assert gallery.list_users("never-created") == []
    assert gallery.delete_user("never-created", "a") == 0


# -- persistence and ownership --------------------------------------------------------------------


def test_gallery_persists_across_reopen(opener: Opener, tmp_path: Path, rng) -> None:
    path = tmp_path / "persist"
    users = {f"p-{i}": unit(rng) for i in range(4)}
    g = opener(path)
    g.ensure_collection(MODEL, DIM)
    g.upsert(MODEL, [mean_t(u, v, tenant="store-9") for u, v in users.items()])
    g.delete_user(MODEL, "p-3")
    g.close()

    g = opener(path)
    try:
        assert g.list_users(MODEL) == ["p-0", "p-1", "p-2"]
        assert g.count(MODEL) == 3
        hit = g.search(MODEL, users["p-1"], tenant="store-9")[0]
        assert hit == Hit("p-1", pytest.approx(1.0, abs=1e-4), "store-9")
        with pytest.raises(ValueError):
            g.search(MODEL, unit(rng, 64))  # the dimension is known after reopen, too
        g.ensure_collection(MODEL, DIM)
        g.upsert(MODEL, [mean_t("p-4", unit(rng), tenant="store-9")])
    finally:
        g.close()
    g = opener(path)
    try:
        assert g.list_users(MODEL) == ["p-0", "p-1", "p-2", "p-4"]
    finally:
        g.close()


def test_edge_keeps_one_shard_directory_per_model(tmp_path: Path, rng) -> None:
    with EdgeGallery(tmp_path) as g:
        g.ensure_collection(MODEL, DIM)
        g.ensure_collection("arcface-r100", 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces__arcface-r100", "faces__dlib-resnet-v1"]


def test_edge_shard_has_one_owner(tmp_path: Path, rng) -> None:
    first = EdgeGallery(tmp_path)
    first.ensure_collection(MODEL, DIM)
    first.upsert(MODEL, [mean_t("a", unit(rng))])
    second = EdgeGallery(tmp_path)
    try:
        with pytest.raises(ShardBusyError):
            second.count(MODEL)
        first.close()
        assert second.count(MODEL) == 1  # free once the owner closed it
    finally:
        first.close()
        second.close()


def test_edge_optimize_keeps_results(tmp_path: Path, rng) -> None:
    with EdgeGallery(tmp_path) as g:
        g.ensure_collection(MODEL, DIM)
        users = {f"u{i}": unit(rng) for i in range(50)}
        g.upsert(MODEL, [mean_t(u, v) for u, v in users.items()])
        g.optimize(MODEL)
        assert g.search(MODEL, users["u7"])[0].user_id == "u7"


# -- naming and opening ---------------------------------------------------------------------------


def test_collection_names_are_sanitised_and_never_collide() -> None:
    assert collection_name("dlib-resnet-v1") == "faces__dlib-resnet-v1"
    assert collection_name("arcface_r100.onnx") == "faces__arcface_r100.onnx"
    odd = collection_name("insightface/buffalo l")
    assert odd.startswith("faces__insightface-buffalo-l-") and "/" not in odd and " " not in odd
    assert collection_name("insightface/buffalo l") != collection_name("insightface-buffalo-l")
    assert collection_name("a/b") != collection_name("a:b")
    assert len(collection_name("x" * 1000)) <= 120
    with pytest.raises(ValueError):
        collection_name("")


def test_point_ids_are_deterministic_uuids() -> None:
    pid = point_id(MODEL, "alice", "mean", 0)
    assert pid == point_id(MODEL, "alice", "mean", 0)
    assert (
        len(
            {
                pid,
                point_id(MODEL, "alice", "sample", 0),
                point_id(MODEL, "alice", "mean", 1),
                point_id("other", "alice", "mean", 0),
                point_id(MODEL, "bob", "mean", 0),
            }
        )
        == 5
    )


def test_open_gallery_dispatches_on_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = open_gallery(f"edge://{tmp_path / 'edge'}")
    assert isinstance(g, EdgeGallery)
    g.close()
    for url in (":memory:", f"qdrant+local://{tmp_path / 'local'}"):
        g = open_gallery(url)
        assert isinstance(g, QdrantGallery)
        g.ensure_collection(MODEL, 4)
        g.close()
    assert (tmp_path / "local").is_dir()

    seen: dict = {}

    class FakeClient:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def close(self):
            pass

    import facepay.gallery.qdrant_server as qs

    monkeypatch.setattr(qs, "QdrantClient", FakeClient)
    monkeypatch.setenv("QDRANT_API_KEY", "secret")
    assert isinstance(open_gallery("https://qdrant.example:6333"), QdrantGallery)
    assert seen["url"] == "https://qdrant.example:6333" and seen["api_key"] == "secret"

    for bad in ("ftp://x", "edge://", "/just/a/path", ""):
        with pytest.raises(ValueError):
            open_gallery(bad)
