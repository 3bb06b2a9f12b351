"""Partitioned streams: where a session's entries and keys live, on one server or on a cluster.

A session (store/session id) belongs to partition crc32("store/session") % stream_partitions.
Every key a session touches — its entry in each stage stream, its state hash, its once-only
decided key, the gateway's counters — carries the partition's hash tag, `{ns}:{p07}:frames`,
`{ns}:{p07}:session:store/id`, `{ns}:{p07}:decided:store/id`, so on a Redis/Valkey Cluster they
share one hash slot: a worker's MULTI/EXEC (outputs + XACK) and the recognizer's once-only Lua
stay single-slot, hence atomic. Global keys (thresholds, spaces, limits, dead letters, admin
streams) keep their plain names and live wherever their own slot is.

With one partition on a plain server (the default) nothing is tagged: today's names.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

from facepay.config import Settings
from facepay.runtime.redis_conn import is_cluster_url

# Streams whose entries belong to one session, hence to its partition.
PARTITIONED_STREAMS = frozenset(
    {"frames", "faces", "aligned", "posed", "embeddings", "decisions", "decision-records", "enrollments"}
)
# Other per-session (or per-partition) keys, by their first name part.
# "archiver": its per-session index (staged, archived) and each partition's open sessions; its
# global turns (sweep-turn, drain-turn) keep the plain name, which the ACL pattern also allows.
PARTITIONED_KEYS = frozenset({"session", "decided", "sessions", "gateway-session", "quarantine", "errors", "archiver"})
_TAG = re.compile(r"\{p(\d+)\}")


@dataclass(frozen=True)
class Partitions:
    namespace: str
    count: int = 1
    tagged: bool = False  # names carry the partition's hash tag (more than one partition, or a cluster)

    @classmethod
    def of(cls, settings: Settings) -> Partitions:
        count = settings.stream_partitions
        return cls(settings.namespace, count, count > 1 or is_cluster_url(settings.redis_url))

    def index(self, session: str) -> int:
        """The partition of a session, spelled "store/session" (recognizer `session_key`)."""
        return zlib.crc32(session.encode()) % self.count

    def key(self, partition: int, *parts: str) -> str:
        if not self.tagged:
            return ":".join((self.namespace, *parts))
        return ":".join((self.namespace, f"{{p{partition:02d}}}", *parts))

    def session_key(self, session: str, *parts: str) -> str:
        """A key of `session`'s partition, e.g. session_key("s1/abc", "decided", "s1/abc")."""
        return self.key(self.index(session), *parts)

    def stream(self, name: str, session: str) -> str:
        """Stream `name` of `session`'s partition (a global stream's one name)."""
        return self.session_key(session, name) if name in PARTITIONED_STREAMS else f"{self.namespace}:{name}"

    def streams(self, name: str) -> list[str]:
        """Every partition's stream `name` (one name for a global stream)."""
        if name not in PARTITIONED_STREAMS:
            return [f"{self.namespace}:{name}"]
        return [self.key(p, name) for p in range(self.count)]

    def all(self, *parts: str) -> list[str]:
        """Key `parts` of every partition (e.g. each partition's sessions:open)."""
        return [self.key(p, *parts) for p in range(self.count)]

    def partition_of_key(self, key: str | bytes) -> int:
        """The partition a tagged key belongs to (0 for untagged names)."""
        text = key.decode() if isinstance(key, bytes) else key
        found = _TAG.search(text)
        return int(found.group(1)) if found else 0

    def sibling(self, key: str | bytes, *parts: str) -> str:
        """Key `parts` in the same partition as `key` (e.g. the errors hash of an input stream)."""
        return self.key(self.partition_of_key(key), *parts)

    def base_name(self, key: str | bytes) -> str:
        """A stream's name inside the namespace without its partition: "fp:{p03}:faces" → "faces"."""
        text = key.decode() if isinstance(key, bytes) else key
        rest = text[len(self.namespace) + 1 :] if text.startswith(self.namespace + ":") else text
        return _TAG.sub("", rest).lstrip(":")


def per_partition(total: int, partitions: int) -> int:
    """How many entries to ask of each partition so that a round brings about `total`."""
    return max(1, math.ceil(total / max(1, partitions)))
