"""Redis connections that survive a server restart: clients reconnect on the next command."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

if TYPE_CHECKING:
    from facepay.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

# Refusals that pass, as opposed to errors in what was asked: the server is full (`maxmemory`
# with noeviction: "OOM command not allowed"), a replica (READONLY: after a failover, until this
# node is promoted or the address leads to the new primary), loading its data (LOADING), without
# its primary (MASTERDOWN), or unreachable. Work meeting them is held and retried, never failed.
# On a cluster, a slot without a primary (failover under way: CLUSTERDOWN), a slot moving
# (TRYAGAIN, MOVED, ASK past the client's redirections) pass too: 'unavailable'.
_REFUSAL_PREFIXES = {
    "OOM ": "oom",
    "READONLY": "readonly",
    "LOADING": "loading",
    "MASTERDOWN": "masterdown",
    "CLUSTERDOWN": "unavailable",
    "TRYAGAIN": "unavailable",
    "MOVED": "unavailable",
    "ASK": "unavailable",
}
# What a Redis call may raise: a cluster client also raises RedisClusterException (a slot no
# node serves yet, …), which is not a RedisError.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


def backpressure_kind(exc: BaseException) -> str | None:
    """'oom', 'readonly', 'loading', 'masterdown' or 'unavailable' for a refusal that passes; else None."""
    if isinstance(exc, redis.OutOfMemoryError):
        return "oom"
    if isinstance(exc, redis.ReadOnlyError):
        return "readonly"
    if isinstance(exc, redis.BusyLoadingError):
        return "loading"
    if isinstance(
        exc,
        (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.ClusterError,
            redis.exceptions.TryAgainError,
            redis.exceptions.AskError,
            redis.exceptions.SlotNotCoveredError,
        ),
    ):
        return "unavailable"
    if isinstance(exc, redis.ResponseError):  # e.g. the refusal of a command inside a script
        message = str(exc)
        return next((kind for prefix, kind in _REFUSAL_PREFIXES.items() if message.startswith(prefix)), None)
    return None


class Backoff:
    """A wait that doubles from first_s up to max_s, and starts over after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """`sleep`: how to wait (a start-up wait sleeps so that a stop request ends it)."""
        self.first_s, self.max_s, self._sleep = first_s, max_s, sleep
        self.next_s = first_s
        self.waiting_since: float | None = None

    def wait(self, at_most_s: float | None = None) -> float:
        """Sleep the current delay; returns how long this stretch of waiting has lasted so far."""
        now = time.monotonic()
        self.waiting_since = self.waiting_since or now
        self._sleep(self.next_s if at_most_s is None else max(0.0, min(self.next_s, at_most_s)))
        self.next_s = min(self.next_s * 2, self.max_s)
        return time.monotonic() - self.waiting_since

    def reset(self) -> float | None:
        """Start over; returns how long the stretch of waiting that ends here lasted, if any."""
        waited = None if self.waiting_since is None else time.monotonic() - self.waiting_since
        self.next_s, self.waiting_since = self.first_s, None
        return waited


# A Redis/Valkey Cluster: `redis+cluster://user@host:port,host:port/0` (rediss+cluster:// for TLS).
# The hosts are where to start discovering the cluster; the client follows its slots from there.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def connect(url: str, block_ms: int = 1000) -> redis.Redis:
    """A client whose socket timeout outlasts the longest XREAD BLOCK it will issue: a plain
    client, or a cluster client (redis.cluster.RedisCluster) for a redis+cluster:// URL."""
    options = {"socket_timeout": block_ms / 1000 + 10, "socket_connect_timeout": 5, "retry_on_timeout": False}
    if is_cluster_url(url):
        return connect_cluster(url, **options)
    return redis.Redis.from_url(url, health_check_interval=15, **options)


def connect_cluster(url: str, **options: Any) -> RedisCluster:
    """A RedisCluster client from `redis+cluster://user:password@host:port,host:port/0?…`."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        nodes.append(ClusterNode(name, int(port)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    first = f"{nodes[0].host}:{nodes[0].port}"
    plain = urlunsplit(
        (
            CLUSTER_SCHEMES[parts.scheme],
            f"{credentials}@{first}" if credentials else first,
            parts.path,
            parts.query,
            parts.fragment,
        )
    )
    # Failover and resharding: follow MOVED/ASK, and re-learn the slots after a node is lost.
    return RedisCluster.from_url(plain, startup_nodes=nodes, require_full_coverage=False, **options)


def plain_url(url: str) -> str:
    """A URL plain clients (rq) can use: for a cluster URL, its first node's (redis://…)."""
    if not is_cluster_url(url):
        return url
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    first = hosts.split(",")[0]
    return urlunsplit(
        (
            CLUSTER_SCHEMES[parts.scheme],
            f"{credentials}@{first}" if credentials else first,
            parts.path,
            parts.query,
            parts.fragment,
        )
    )


def reset_connections(client: redis.Redis) -> None:
    """Drop pooled connections (after a failover the address may lead to the new primary); a
    cluster client re-learns which node serves which slot on its next command."""
    if is_cluster(client):
        client.nodes_manager.initialize()
    else:
        client.connection_pool.disconnect()


def durable_xadd(client: redis.Redis, stream: str, fields: dict, settings: Settings) -> bytes:
    """XADD, returning once `settings.redis_wait_replicas` replicas have the entry too: an entry
    acknowledged to its sender survives the loss of the primary (a failover promotes a replica
    that has it). Not enough replicas in time is 'unavailable': the sender retries (a duplicate
    frame is harmless, a lost one is not)."""
    if settings.redis_wait_replicas <= 0:
        return client.xadd(stream, fields)
    recorder = command_recorder()
    recorder.xadd(stream, fields)
    return replicated(client, stream, recorded(recorder), settings.redis_wait_replicas, settings.redis_wait_timeout_ms)[
        0
    ]


def command_recorder() -> redis.client.Pipeline:
    """A pipeline that only records the commands queued on it (never sent): `recorded` lists them."""
    return redis.client.Pipeline(None, {}, False, None)


def recorded(recorder: redis.client.Pipeline) -> list[tuple]:
    return [args for args, _ in recorder.command_stack]


def replicated(
    client: redis.Redis, key: str, commands: list[tuple], replicas: int, timeout_ms: int, transaction: bool = False
) -> list:
    """Send `commands` (in MULTI/EXEC with `transaction`) and WAIT for `replicas` replicas, all on
    one connection to the node holding `key` (WAIT counts that connection's writes). Returns
    the commands' raw replies; a refusal inside the transaction is raised."""
    try:
        return _replicated(client, key, commands, replicas, timeout_ms, transaction)
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.AskError, redis.exceptions.ClusterError):
        # This bypasses the cluster client's own redirection handling: after a failover or a
        # slot move, re-learn the slots (then the caller's retry reaches the right node).
        if is_cluster(client):
            with contextlib.suppress(*REDIS_ERRORS):
                client.nodes_manager.initialize()
        raise


def _replicated(
    client: redis.Redis, key: str, commands: list[tuple], replicas: int, timeout_ms: int, transaction: bool
) -> list:
    node_client = client.get_redis_connection(client.get_node_from_key(key)) if is_cluster(client) else client
    sent = ([("MULTI",), *commands, ("EXEC",)] if transaction else list(commands)) + [("WAIT", replicas, timeout_ms)]
    pool = node_client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(connection.pack_commands(sent))
        replies, failure = [], None
        for _ in sent:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:  # keep reading: the connection stays in step
                failure = failure or exc
                replies.append(exc)
    except BaseException:
        connection.disconnect()  # mid-exchange: never hand a connection out of step back
        raise
    finally:
        pool.release(connection)
    if failure is not None:
        raise failure
    results = replies[-2] if transaction else replies[:-1]
    for result in results if isinstance(results, list) else ():
        if isinstance(result, redis.ResponseError):
            raise result
    acked = int(replies[-1])
    if acked < replicas:
        raise redis.ConnectionError(
            f"only {acked} of {replicas} replicas acknowledged the write within {timeout_ms} ms"
        )
    return results


def with_retry(fn: Callable[[], T], what: str, deadline_s: float = 60.0) -> T:
    """Call fn until the server answers (restart, loading AOF, full, read-only); give up after deadline_s."""
    delay, start = 0.1, time.monotonic()
    while True:
        try:
            return fn()
        except redis.RedisError as exc:
            if backpressure_kind(exc) is None or time.monotonic() - start > deadline_s:
                raise
            log.warning("redis unavailable, retrying", extra={"what": what, "error": str(exc), "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
