"""Pass-through stages: the pipeline's stream work without its models.

What is left when the models are taken out is the Redis-bound cost of the pipeline — reads,
signed envelopes, transactions, once-only decisions — which is what a cluster scales. Used by
`bench/cluster.py` and the cluster tests (tests/test_cluster_streams.py):

    source → {ns}:{pNN}:frames → relay → {ns}:{pNN}:faces → decide → {ns}:{pNN}:decisions
"""

from __future__ import annotations

import json

from facepay.config import Settings
from facepay.messages import FrameMsg, Message
from facepay.runtime.partitions import Partitions
from facepay.runtime.redis_conn import connect
from facepay.runtime.stage import Emit, PipeStage, Stage, session_of

COMPONENTS = ("source", "relay", "decide")  # their keys: facepay.keys.generate(folder, COMPONENTS)


class Relay(PipeStage):
    """Passes frames on unchanged (a detector without a model)."""

    name, input, output, accepts = "relay", "frames", "faces", FrameMsg
    accepts_from = {t: frozenset({"source"}) for t in ("frame", "rejection", "end")}

    def handle(self, batch: list[Message]) -> list[Message]:
        return batch


class Decide(Stage):
    """Decides a session once it has `frames` frames (a recognizer without a model); the frames
    seen are kept in the session's partition, as the recognizer keeps its session state."""

    name, input = "decide", "faces"
    accepts_from = {t: frozenset({"relay"}) for t in ("frame", "rejection", "end")}

    def __init__(self, settings: Settings, frames: int) -> None:
        self.redis = connect(settings.redis_url)
        self.partitions = Partitions.of(settings)
        self.frames = frames

    def process(self, batch: list[Message]) -> list[Emit]:
        emits = []
        for message in batch:
            session = session_of(message)
            seen = self.partitions.session_key(session, "session", session)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(seen, str(message.ref.sequence), 1)
            pipe.hlen(seen)
            pipe.expire(seen, 3600)
            if pipe.execute()[1] >= self.frames:
                body = {"session_id": message.ref.session_id, "store_id": message.ref.store_id, "frames": self.frames}
                emits.append(
                    Emit(
                        "decisions",
                        {b"payload": json.dumps(body).encode()},
                        once_key=f"decided:{session}",
                        partition_key=session,
                    )
                )
        return emits
