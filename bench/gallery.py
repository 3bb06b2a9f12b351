"""Gallery at scale: load, index build, memory, and search latency and recall per backend and size.

    .venv/bin/python bench/gallery.py [--sizes 10000,100000] [--backends edge,local] [--ef 128,256]
                                      [--vectors faces|random] [--real embeddings.npz] [--queries 200]

Tuning comes from the settings (``FACEPAY_QDRANT_*``, `facepay.config.QdrantTuning`), as in
production; ``--ef`` sweeps the search-time ``hnsw_ef``.

Vectors. ``faces`` (default) are drawn like dlib-resnet-v1 face embeddings: a Gaussian fitted to
2,499 LFW embeddings (643 people; ``facepay calibrate --cache``) -- a narrow cone (mean of the unit
vectors has norm 0.91, strangers' cosine 0.83 ± 0.035, the same person's 0.95) whose variance
sits in ~70 of the 128 dimensions. Random unit vectors are the opposite (strangers' cosine
0 ± 0.09, all 128 dimensions used): an easier problem for scalar quantization's value range
and a harder one for HNSW (no low-dimensional structure). Queries are genuine probes: an enrolled
user's template plus same-person noise (cosine ≈ 0.95 to it), so the nearest neighbours are as
close as a payment's are. ``--real FILE.npz`` (an embedding cache, private biometric data: keep it
out of the repository) fits the Gaussian to those embeddings instead and mixes them in: each
person's first photo is enrolled and their other photos are extra probes.

Users are spread over 50 tenants and 10,000 phone suffixes (independent of the tenant: tenant +
suffix matches ~N / 500,000 users); one "mean" template per user; each query asks for the two best
distinct users, as the recognizer does. recall@1 compares the gallery's best user with an exact
numpy search over the same vectors and filter. Searches are also timed while the index is built
and while a bulk enrollment writes, from another thread, as payments would run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepay.config import QdrantTuning, load_settings
from facepay.gallery import Template, open_gallery

MODEL = "bench-model"
TENANTS = 50
SUFFIXES = 10_000
BATCH = 10_000
# Eigenvalues of the covariance of 2,499 LFW dlib-resnet-v1 embeddings at these ranks (0-based);
# interpolated log-linearly between them; beyond rank 72 the variance is nil.
FACE_SPECTRUM = (
    (0, 0.016),
    (1, 0.012),
    (2, 0.009),
    (4, 0.0069),
    (8, 0.0045),
    (16, 0.0027),
    (24, 0.002),
    (32, 0.0016),
    (48, 0.00091),
    (64, 0.00051),
    (72, 1e-7),
)
FACE_MEAN_NORM = 0.913
SAME_PERSON_VARIANCE = 0.2  # same-person spread / between-person spread (LFW: 0.18² / 0.41²)


@dataclasses.dataclass
class VectorModel:
    """Vectors = normalise(mean + noise with covariance V diag(w) Vᵀ); queries add ``same`` × that noise."""

    mean: np.ndarray
    w: np.ndarray
    V: np.ndarray
    real: np.ndarray | None = None  # real embeddings enrolled as the first users
    real_probes: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)

    @classmethod
    def faces(cls, dim: int, rng: np.random.Generator) -> VectorModel:
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        ranks, values = zip(*FACE_SPECTRUM, strict=True)
        w = np.exp(np.interp(np.arange(dim - 1), ranks, np.log(values)))
        return cls(mean=FACE_MEAN_NORM * q[:, 0], w=w, V=q[:, 1:])

    @classmethod
    def random(cls, dim: int) -> VectorModel:
        return cls(mean=np.zeros(dim), w=np.ones(dim), V=np.eye(dim))

    @classmethod
    def fitted(cls, path: str) -> VectorModel:
        z = np.load(path, allow_pickle=False)
        x = z["vectors"][z["usable"]].astype(np.float64)
        labels = np.array(z["labels"])[z["usable"]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mean = x.mean(0)
        w, V = np.linalg.eigh(np.cov((x - mean).T))
        people = sorted(set(labels))
        firsts = [int(np.flatnonzero(labels == p)[0]) for p in people]
        probes = [(k, x[i]) for k, p in enumerate(people) for i in np.flatnonzero(labels == p)[1:]]
        return cls(mean=mean, w=np.clip(w, 0, None), V=V, real=x[firsts].astype(np.float32), real_probes=probes)

    def sample(self, n: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((n, self.w.shape[0])) * np.sqrt(self.w * scale)) @ self.V.T

    def batch(self, seed: int, start: int, n: int) -> np.ndarray:
        """Vectors of users start..start+n-1 (regenerated identically on demand, never all held)."""
        v = self.mean + self.sample(n, np.random.default_rng((seed, start)))
        if self.real is not None and start < len(self.real):
            k = min(n, len(self.real) - start)
            v[:k] = self.real[start : start + k]
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def probe(self, template: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        v = template + self.sample(1, rng, SAME_PERSON_VARIANCE)[0]
        return (v / np.linalg.norm(v)).astype(np.float32)


def tenant_of(i: int) -> str:
    return f"t{i % TENANTS}"


def suffix_of(i: int) -> str:
    return f"{(i // TENANTS) % SUFFIXES:04d}"


def rss_mb() -> tuple[float, float]:
    """This process's resident and peak resident memory, MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def pct(times: list[float]) -> str:
    if not times:
        return "no searches"
    times = sorted(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return (
        f"p50 {statistics.median(times):7.2f} ms  p99 {p99:7.2f} ms  max {times[-1]:7.1f} ms  ({len(times)} searches)"
    )


FRESH = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from facepay.config import load_settings
from facepay.gallery import open_gallery
g = open_gallery({url!r}, tuning=load_settings().qdrant)
rng = np.random.default_rng(0)
for i in range(200):
    g.search({model!r}, rng.standard_normal({dim}).astype(np.float32), limit=2, tenant=None if i % 2 else "t7")
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(int(status["VmRSS"].split()[0]) // 1024)
g.close()
"""


def fresh_process_rss(url: str, dim: int) -> int:
    """RSS (MB) of a new process that opens the gallery and searches 200 times: a restarted
    recognizer's memory for the gallery, without this bench's load-time heap."""
    code = FRESH.format(root=str(Path(__file__).resolve().parents[1]), url=url, model=MODEL, dim=dim)
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )


class Background:
    """Searches from another thread (as payments would run) while the main thread works."""

    def __init__(self, gallery, vector: np.ndarray, tenant: str) -> None:
        self.gallery, self.vector, self.tenant = gallery, vector, tenant
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.gallery.search(MODEL, self.vector, limit=2, tenant=self.tenant)
            self.times.append((time.perf_counter() - started) * 1000)
            self._stop.wait(0.01)  # ~ 100 payment searches a second

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_queries(model: VectorModel, seed: int, n: int, count: int, rng: np.random.Generator) -> dict:
    """Probes per filter: (user index, probe vector, filters)."""
    out: dict[str, list] = {"no filter": [], "tenant": [], "tenant + suffix": []}
    for label in out:
        for _ in range(count):
            i = int(rng.integers(0, n))
            if label != "no filter":
                i = i - i % TENANTS + 7 if i - i % TENANTS + 7 < n else 7  # a user of tenant t7
            filters = {} if label == "no filter" else {"tenant": tenant_of(i)}
            if label == "tenant + suffix":
                filters["phone_suffix"] = suffix_of(i)
            out[label].append((i, model.probe(model.batch(seed, i, 1)[0], rng), filters))
    if model.real_probes:
        out["real probes"] = [(k, p.astype(np.float32), {}) for k, p in model.real_probes[:count]]
    return out


def exact_best(model: VectorModel, seed: int, n: int, queries: dict) -> dict[str, list[str]]:
    """The exact best user of every query under its filter (numpy over regenerated batches)."""
    flat = [(label, k, q, f) for label, qs in queries.items() for k, (_, q, f) in enumerate(qs)]
    best = np.full(len(flat), -np.inf)
    arg = np.zeros(len(flat), int)
    qmat = np.stack([q for _, _, q, _ in flat])
    for start in range(0, n, BATCH):
        idx = np.arange(start, min(n, start + BATCH))
        scores = model.batch(seed, start, len(idx)) @ qmat.T
        for j, (_, _, _, f) in enumerate(flat):
            col = scores[:, j].copy()
            if "tenant" in f:
                col[idx % TENANTS != int(f["tenant"][1:])] = -np.inf
            if "phone_suffix" in f:
                col[(idx // TENANTS) % SUFFIXES != int(f["phone_suffix"])] = -np.inf
            k = int(np.argmax(col))
            if col[k] > best[j]:
                best[j], arg[j] = col[k], idx[k]
    out: dict[str, list[str]] = {label: [] for label in queries}
    for (label, _, _, _), i in zip(flat, arg, strict=True):
        out[label].append(f"u{i}")
    return out


def load(gallery, model: VectorModel, seed: int, n: int, start: int = 0) -> None:
    for s in range(start, start + n, BATCH):
        k = min(start + n, s + BATCH) - s
        vectors = model.batch(seed, s, k)
        gallery.upsert(
            MODEL,
            [
                Template(f"u{s + j}", vectors[j], tenant=tenant_of(s + j), phone_suffix=suffix_of(s + j))
                for j in range(k)
            ],
        )


def run(
    backend: str, url: str, n: int, dim: int, queries: int, efs: list[int], model: VectorModel, tuning: QdrantTuning
) -> None:
    seed = n
    rng = np.random.default_rng(seed)
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(
        f"{backend}  {n:,} x {dim}  (m {tuning.hnsw_m}, ef_construct {tuning.hnsw_ef_construct}, "
        f"quantization {tuning.quantization}, oversampling {tuning.oversampling}, indexing threads {tuning.indexing_threads})"
    )
    gallery = open_gallery(url, tuning=tuning)
    gallery.ensure_collection(MODEL, dim)
    started = time.perf_counter()
    load(gallery, model, seed, n)
    say(f"    load {time.perf_counter() - started:7.1f} s   RSS {rss_mb()[0]:.0f} MB")
    probe = model.probe(model.batch(seed, 7, 1)[0], rng)
    if hasattr(gallery, "optimize"):
        started = time.perf_counter()
        with Background(gallery, probe, tenant_of(7)) as meanwhile:
            gallery.optimize(MODEL)
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        say(f"    index build {time.perf_counter() - started:7.1f} s (child process, peak RSS {child_peak:.0f} MB)")
        say(f"    searches during the build (tenant):   {pct(meanwhile.times)}")
        gallery.close()
        fresh = fresh_process_rss(url, dim)
        started = time.perf_counter()
        gallery = open_gallery(url, tuning=tuning)
        gallery.count(MODEL)
        say(
            f"    open the built gallery {time.perf_counter() - started:5.1f} s (also the swap's pause)   "
            f"RSS {rss_mb()[0]:.0f} MB; a fresh process with it open: {fresh} MB"
        )
    qs = make_queries(model, seed, n, queries, rng)
    started = time.perf_counter()
    truth = exact_best(model, seed, n, qs)
    say(f"    exact answers (numpy) {time.perf_counter() - started:.1f} s")
    for ef in efs:
        if hasattr(gallery, "optimize"):  # the embedded engine takes search tuning when opened
            gallery.close()
            gallery = open_gallery(url, tuning=dataclasses.replace(tuning, hnsw_ef=ef))
        started = time.perf_counter()
        gallery.search(MODEL, probe, limit=2)
        first = (time.perf_counter() - started) * 1000
        for _ in range(20):  # page in what a warm recognizer has in memory
            gallery.search(MODEL, model.probe(probe, rng), limit=2)
        say(f"    hnsw_ef {ef:<4} first search after opening {first:.1f} ms (cold pages), then 20 warm-up searches")
        for label, items in qs.items():
            times, right = [], 0
            for (_, q, filters), expected in zip(items, truth[label], strict=True):
                started = time.perf_counter()
                hits = gallery.search(MODEL, q, limit=2, **filters)
                times.append((time.perf_counter() - started) * 1000)
                right += bool(hits) and hits[0].user_id == expected
            say(f"    hnsw_ef {ef:<4} {label:<16} {pct(times)}  recall@1 {right / len(items):.3f}")
    enrol = min(20_000, max(1000, n // 50))
    with Background(gallery, probe, tenant_of(7)) as meanwhile:
        started = time.perf_counter()
        load(gallery, model, seed, enrol, start=n)
        wrote = time.perf_counter() - started
    say(f"    searches during a bulk enrollment of {enrol:,} ({wrote:.1f} s):   {pct(meanwhile.times)}")
    rss, peak = rss_mb()
    say(f"    RSS {rss:.0f} MB, peak {peak:.0f} MB; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    gallery.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--backends", default="edge,local", help="edge (qdrant-edge-py), local (qdrant-client local mode)"
    )
    parser.add_argument("--ef", default="", help="hnsw_ef values to sweep (default: the setting)")
    parser.add_argument("--vectors", choices=("faces", "random"), default="faces")
    parser.add_argument("--real", help="an embedding cache (.npz) to fit the vectors to and mix in")
    args = parser.parse_args()
    tuning = load_settings().qdrant
    efs = [int(x) for x in args.ef.split(",")] if args.ef else [tuning.hnsw_ef]
    rng = np.random.default_rng(0)
    if args.real:
        model = VectorModel.fitted(args.real)
    else:
        model = VectorModel.faces(args.dim, rng) if args.vectors == "faces" else VectorModel.random(args.dim)
    dim = model.mean.shape[0]
    print(
        f"vectors: {'fitted to ' + args.real if args.real else args.vectors}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    backends = args.backends.split(",")
    for n in (int(s) for s in args.sizes.split(",")):
        if "edge" in backends:
            with tempfile.TemporaryDirectory() as tmp:
                run("qdrant-edge (embedded)", f"edge://{tmp}/edge", n, dim, args.queries, efs, model, tuning)
        if "local" in backends:
            if n > 100_000:
                print(f"qdrant-client local: skipped at {n:,} (an exact scan in Python)", flush=True)
                continue
            local_queries = max(5, args.queries * 10_000 // n // 10)
            run("qdrant-client local", ":memory:", n, dim, local_queries, efs[:1], model, tuning)


if __name__ == "__main__":
    main()
