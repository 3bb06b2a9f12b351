"""Child process of `EdgeGallery.optimize`: ``python -m facepay.gallery.edge_build SHARD_DIR``.

Opens the shard copy in SHARD_DIR with its persisted configuration, runs qdrant-edge's
optimizers (HNSW build, quantization), flushes, closes, and prints ``{"optimized": bool}``.
It runs apart from the gallery's owner because qdrant-edge's ``optimize`` holds the GIL.
"""

from __future__ import annotations

import json
import sys

import qdrant_edge as qe


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m facepay.gallery.edge_build SHARD_DIR", file=sys.stderr)
        return 2
    shard = qe.EdgeShard.load(argv[0])
    try:
        optimized = bool(shard.optimize())
        shard.flush()
    finally:
        shard.close()
    print(json.dumps({"optimized": optimized}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
