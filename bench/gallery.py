"""Gallery search latency: p50/p99 with and without filters, per backend and gallery size.

    .venv/bin/python bench/gallery.py [--sizes 10000,100000] [--dim 128] [--queries 200]

Random unit vectors (the latency of an exact or HNSW search does not depend on faces), spread
over 50 tenants and 1,000 phone suffixes; one "mean" template per user. Each query asks for
the two best distinct users, as the recognizer does. Measured in one run on this machine.
qdrant-client's local mode is an exact scan in Python: at 100k it gets a handful of queries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facepay.gallery import Template, open_gallery

MODEL = "bench-model"


def templates(n: int, dim: int, rng: np.random.Generator) -> list[Template]:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Template(f"u{i}", vectors[i], tenant=f"t{i % 50}", phone_suffix=f"{i % 1000:04d}") for i in range(n)]


def measure(gallery, dim: int, queries: int, rng: np.random.Generator, **filters) -> tuple[float, float]:
    times = []
    for _ in range(queries):
        q = rng.standard_normal(dim).astype(np.float32)
        q /= np.linalg.norm(q)
        started = time.perf_counter()
        gallery.search(MODEL, q, limit=2, **filters)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]


def run(backend: str, url: str, n: int, dim: int, queries: int) -> list[str]:
    rng = np.random.default_rng(n)
    gallery = open_gallery(url)
    gallery.ensure_collection(MODEL, dim)
    started = time.perf_counter()
    items = templates(n, dim, rng)
    for i in range(0, n, 2000):
        gallery.upsert(MODEL, items[i:i + 2000])
    load_s = time.perf_counter() - started
    extra = ""
    if hasattr(gallery, "optimize"):
        started = time.perf_counter()
        gallery.optimize(MODEL)
        extra = f", HNSW build {time.perf_counter() - started:.1f} s"
    rows = [f"{backend:<22} {n:>8,} x {dim}: load {load_s:.1f} s{extra}"]
    for label, filters in (("no filter", {}), ("tenant", {"tenant": "t7"}), ("tenant + suffix", {"tenant": "t7", "phone_suffix": "0007"})):
        p50, p99 = measure(gallery, dim, queries, rng, **filters)
        rows.append(f"    {label:<16} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms   ({queries} queries)")
    gallery.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--backends", default="edge,local", help="edge (qdrant-edge-py), local (qdrant-client local mode)")
    args = parser.parse_args()
    backends = args.backends.split(",")
    for n in (int(s) for s in args.sizes.split(",")):
        if "edge" in backends:
            with tempfile.TemporaryDirectory() as tmp:
                for line in run("qdrant-edge (embedded)", f"edge://{tmp}/edge", n, args.dim, args.queries):
                    print(line, flush=True)
        if "local" in backends:
            local_queries = max(5, args.queries * 10_000 // n // 10)
            for line in run("qdrant-client local", ":memory:", n, args.dim, local_queries):
                print(line, flush=True)


if __name__ == "__main__":
    main()
