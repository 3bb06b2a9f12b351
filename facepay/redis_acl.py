"""Redis/Valkey ACL users, one per component, each with only the keys and commands it needs.

Why: anyone who can write to Redis could otherwise mint a decision (XADD to `{ns}:posed`),
delete users or read enrolled faces. With these users a stage reads only its input stream and
appends only to its output and the dead-letter stream; only the recognizer touches session
state, the decided keys and the kept enrollment chips; scripts (EVAL) run only the commands and
keys their user may (the recognizer's write-once decision, every worker's safe trimming); nobody
may run FLUSHALL, CONFIG, KEYS, DEBUG, SCRIPT, ACL, MONITOR …

The embedded Valkey is started with these users (`default` off) and generated passwords
(`EmbeddedValkey`); for a managed Redis 7 / Valkey, `facepay redis acl` prints the same users
as `ACL SETUSER` lines. Adding a key or command to a component means adding it here.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from facepay.private_files import write_private
from facepay.runtime.partitions import PARTITIONED_KEYS, PARTITIONED_STREAMS

STAGE_STREAMS = {  # stage: (input stream, output stream)
    "detector": ("frames", "faces"),
    "aligner": ("faces", "aligned"),
    "pose": ("aligned", "posed"),
    "recognizer": ("posed", "decisions"),
}
COMPONENTS = ("gateway", "detector", "aligner", "pose", "recognizer", "archiver", "operator", "backend", "keda")
ADMIN = "admin"  # the embedded server's owner (supervisor, tests): never handed to a component

# Keyless housekeeping every client needs (rq and the
# gateway read INFO; a worker's outputs and acknowledgement are one MULTI/EXEC).
_CONNECTION = "+ping +hello +auth +select +client|setname +client|getname +client|id +client|info +info +multi +exec +discard +readonly +acl|whoami"
# A cluster client learns the slots and the commands' key positions, follows ASK redirections;
# WAIT: a write acknowledged to a camera is on `redis_wait_replicas` replicas (keyless).
_CONNECTION += (
    " +cluster|slots +cluster|shards +cluster|nodes +cluster|info +cluster|myid +command +asking +readwrite +wait"
)
_READ_STREAM = "+xread +xrange +xrevrange +xlen +xinfo"
# A consumer group's reader: XREADGROUP/XACK/XAUTOCLAIM are write commands on the stream.
_CONSUME = "+xreadgroup +xack +xgroup|create +xgroup|createconsumer +xautoclaim +xclaim +xpending +xinfo +xlen"


def _keys(ns: str, *names: str, prefix: str = "~") -> str:
    """Key patterns of `names`; a per-session (partitioned) name also in every partition's hash
    tag (facepay.runtime.partitions): `~fp:frames ~fp:{p*}:frames`."""
    return " ".join(f"{prefix}{pattern}" for n in names for pattern in _patterns(ns, n))


def _patterns(ns: str, name: str) -> list[str]:
    if name.split(":")[0] in PARTITIONED_STREAMS | PARTITIONED_KEYS:
        return [f"{ns}:{name}", f"{ns}:{{p*}}:{name}"]
    return [f"{ns}:{name}"]


def _stage_rules(ns: str, stage: str) -> list[str]:
    source, target = STAGE_STREAMS[stage]
    return [
        # its input: consume, erase processed enrollment entries (XDEL)
        f"({_keys(ns, source)} {_CONSUME} +xrange +xdel)",
        # its output and the dead letters: append only
        f"({_keys(ns, target, 'dead')} +xadd +xinfo +xlen)",
        # trimming (facepay.runtime.worker._TRIM_SAFELY): one script over each stream it reads or
        # writes, which never cuts past the oldest entry a consumer group has not processed
        f"({_keys(ns, source, target, 'dead')} +eval +evalsha +exists +xinfo|groups +xpending +xlen +xtrim)",
        # failures per entry: last error, failure count, "processing it alone" mark
        f"({_keys(ns, 'errors:' + stage)} +hset +hget +hdel +hgetall +hincrby +expire)",
        f"({_keys(ns, 'workers:ready')} +sadd)",
    ]


def _recognizer_rules(ns: str) -> list[str]:
    return _stage_rules(ns, "recognizer") + [
        # write-once decisions (with their decision records for the archiver) and enrollment
        # results (EVAL checks its keys, then each call in it)
        f"({_keys(ns, 'decided:*', 'decisions', 'decision-records', 'enrollments', 'admin-replies')} "
        "+eval +evalsha +exists +xadd +set +xinfo +xlen)",
        # erasure: enrollment results naming a deleted user
        f"({_keys(ns, 'enrollments', 'admin-replies')} +xrange +xdel)",
        # session state, failure limits, kept enrollment chips, template spaces
        f"({_keys(ns, 'session:*', 'sessions:open', 'limits:*', 'faces:*', 'spaces')} "
        "+hsetnx +hset +hget +hgetall +expire +del +exists +zadd +zrangebyscore +zrem +set +get +incr +incrby +sadd +smembers)",
        # an unreadable session state is moved aside (RENAME checks both keys)
        f"({_keys(ns, 'session:*', 'quarantine:session:*')} +rename +expire)",
        # operator commands are carried out once: their request ids (SET NX EX)
        f"({_keys(ns, 'admin-requests:*')} +set)",
        # per-face embeddings for the archiver (only with archive_keep_embeddings): append only
        f"({_keys(ns, 'embeddings')} +xadd +xinfo +xlen)",
        # the recognizer trims what it writes: decisions and their records, enrollment results,
        # replies, embeddings
        f"({_keys(ns, 'decisions', 'decision-records', 'enrollments', 'admin-replies', 'embeddings')} "
        "+eval +evalsha +exists +xinfo|groups +xpending +xlen +xtrim)",
        f"(%R~{ns}:thresholds +hget +hgetall)",
        # after erasing a user, rewrite the AOF so the erased entries leave the disk too
        "+scan +bgrewriteaof",
    ]


def _archiver_rules(ns: str) -> list[str]:
    """The archiver reads the decision records (its input) and every per-frame stream in its own
    group (the streams are its staging area: entries stay pending there until their session is
    archived) and writes only dead letters and its own per-session index. It has no business on
    `{ns}:decisions`: the record carries the event as signed."""
    taps = ("frames", "faces", "aligned", "posed", "embeddings")
    return [
        f"({_keys(ns, 'decision-records', *taps)} {_CONSUME} +xrange)",
        f"({_keys(ns, 'dead')} +xadd +xinfo +xlen)",
        f"({_keys(ns, 'decision-records', 'dead')} +eval +evalsha +exists +xinfo|groups +xpending +xlen +xtrim)",
        f"({_keys(ns, 'errors:archiver')} +hset +hget +hdel +hgetall +hincrby +expire)",
        f"({_keys(ns, 'workers:ready')} +sadd)",
        # the per-session index scripts (services/archiver/stage.py) and the acknowledgement of a
        # session's entries once archived
        f"({_keys(ns, 'archiver:*', *taps)} +eval +evalsha +exists +sadd +smembers +del +zadd +zrem "
        "+zrangebyscore +set +get +xack)",
    ]


def rules(component: str, ns: str) -> list[str]:
    """The ACL rules of one component (without its password), Redis 7 selector syntax."""
    if component in STAGE_STREAMS:
        return _recognizer_rules(ns) if component == "recognizer" else _stage_rules(ns, component)
    if component == "archiver":
        return _archiver_rules(ns)
    if component == "gateway":
        return [
            f"({_keys(ns, 'frames')} +xadd +xinfo +xlen)",
            f"({_keys(ns, 'decisions', 'enrollments', prefix='%R~')} {_READ_STREAM})",
            # whether a session is already decided (a point of sale's retry is refused)
            f"({_keys(ns, 'decided:*', prefix='%R~')} +exists +get)",
            # per-session frame and duration caps (services/gateway/guard.py)
            f"({_keys(ns, 'gateway-session:*')} +hsetnx +hincrby +hget +expire)",
        ]
    if component == "operator":  # CLI and rq jobs acting for an operator
        return [
            f"({_keys(ns, 'posed')} +xadd)",  # admin commands (authenticated by the operator's key)
            f"({_keys(ns, 'admin-replies', 'decisions', 'dead', prefix='%R~')} {_READ_STREAM})",
            f"({_keys(ns, 'thresholds')} +hset +hget +hgetall)",
            f"(%R~{ns}:faces:* +get)",  # re-index reads the kept chips
            # rq's own keys and pub/sub channel; no dangerous or scripting commands
            "(~rq:* &rq:* +@read +@write +@list +@hash +@set +@sortedset +@string +@stream +@keyspace +@pubsub "
            "+@transaction -@dangerous)",
            "+scan",
        ]
    if component == "backend":  # payment backends: decision events only (never the decision records)
        return [
            f"({_keys(ns, 'decisions')} {_CONSUME} {_READ_STREAM})",
            # facepay.decisions.SeenEvents shared through Redis: event ids acted on (SET NX EX)
            "(~facepay-backend:seen:* +set)",
        ]
    if component == "keda":  # the autoscaler: lag and pending, never the entries
        return [f"(%R~{ns}:* +xinfo|groups +xinfo|stream +xinfo|consumers +xpending +xlen)"]
    raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def user_line(component: str, ns: str, password: str) -> str:
    """`user …` line of an ACL file: the password only as its SHA-256."""
    return " ".join(
        [
            "user",
            component,
            "reset",
            "on",
            f"#{password_hash(password)}",
            "resetchannels",
            "-@all",
            _CONNECTION,
            *rules(component, ns),
        ]
    )


def acl_file_text(ns: str, passwords: dict[str, str]) -> str:
    lines = ["user default off reset resetchannels -@all"]
    lines += [user_line(c, ns, p) for c, p in passwords.items() if c != ADMIN]
    if ADMIN in passwords:
        lines.append(f"user {ADMIN} reset on #{password_hash(passwords[ADMIN])} ~* &* +@all")
    return "\n".join(lines) + "\n"


def setuser_commands(ns: str, passwords: dict[str, str]) -> list[str]:
    """`ACL SETUSER` lines for a managed Redis (run them as its administrator)."""
    return ["ACL SETUSER " + user_line(c, ns, p)[len("user ") :] for c, p in passwords.items() if c != ADMIN]


def load_or_create_passwords(directory: Path, components: tuple[str, ...]) -> dict[str, str]:
    """`<component>.password` files (0600, in a 0700 folder), generated once and kept."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords = {}
    for component in components:
        path = directory / f"{component}.password"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32) + "\n")
        passwords[component] = path.read_text().strip()
    return passwords


def component_url(base_url: str, user: str, password: str | None = None) -> str:
    """`base_url` with `user` (and the password, if given) as its credentials."""
    parts = urlsplit(base_url)
    hosts = parts.netloc.rpartition("@")[2] or "127.0.0.1"  # host:port, or a cluster's host:port,host:port
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    netloc = f"{auth}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
