"""Runs the whole pipeline on one machine: embedded Valkey, embedded SeaweedFS (the audit
archive), gateway, the four stage workers and the archiver as separate processes — what
`facepay demo` and the end-to-end tests start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facepay import keys, redis_acl
from facepay.app.stages import STAGES
from facepay.archive import ArchiveKeys, EmbeddedS3
from facepay.config import Settings
from facepay.grpc_tls import ClientTLS, client_channel, make_local_certificates
from facepay.private_files import write_private
from facepay.runtime.embedded import EmbeddedValkey, free_port
from facepay.runtime.embedded_cluster import EmbeddedValkeyCluster
from facepay.runtime.redis_conn import connect

log = logging.getLogger(__name__)


def settings_to_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in dataclasses.asdict(settings).items():
        if isinstance(value, dict):
            prefix = f"FACEPAY_{name.upper()}_"
            env.update({prefix + k.upper(): "" if v is None else str(v) for k, v in value.items()})
        else:
            env[f"FACEPAY_{name.upper()}"] = str(value)
    return env


def with_local_tls(settings: Settings, directory: Path) -> Settings:
    """The gateway speaks TLS here too (secure by default): a throw-away CA and certificate for
    loopback, unless the settings bring their own."""
    if settings.grpc_tls_cert_file:
        return settings
    ca, cert, key = make_local_certificates(directory)
    return settings.replace(grpc_tls_cert_file=str(cert), grpc_tls_key_file=str(key), grpc_tls_ca_file=str(ca))


def demo_access(stores: dict[str, list[str]], tenant: str = "demo") -> dict:
    """A cameras file for stores → camera ids, with fresh random tokens."""
    return {
        "stores": {s: {"tenant": tenant, "backend_token": secrets.token_hex(16)} for s in stores},
        "cameras": {c: {"store": s, "token": secrets.token_hex(16)} for s, cams in stores.items() for c in cams},
    }


def component_secrets(
    env: dict[str, str], component: str, valkey: EmbeddedValkey | EmbeddedValkeyCluster | None, keys_dir: Path
) -> dict[str, str]:
    """Only what `component` needs: its own message-signing key and everyone's public keys (the
    operator's key stays with the supervisor, which acts as the operator), its own Redis user on
    the embedded server (the password in a 0600 file, not in the environment), and the decision
    signing key for the signer only."""
    env = dict(env)
    env.update(
        FACEPAY_KEY_FILE=str(keys_dir / f"{component}.key"),
        FACEPAY_TRUSTED_KEYS_FILE=str(keys_dir / keys.TRUSTED_FILE),
        FACEPAY_OPERATOR_KEY_FILE="",
    )
    if valkey is not None:
        url = redis_acl.component_url(valkey.url_for(component), component)  # the user, no password
        env.update(
            REDIS_URL=url,
            FACEPAY_REDIS_URL=url,
            FACEPAY_REDIS_PASSWORD_FILE=str(valkey.credentials_dir / f"{component}.password"),
        )
    if component != "recognizer":
        env.pop("FACEPAY_SIGNING_KEY", None)
    return env


ARCHIVE_BUCKET = "facepay-archive"


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        access: dict,
        replicas: dict[str, int] | None = None,
        embedded: bool = True,
        archive: bool = True,
        gateway: bool = True,
        valkey: EmbeddedValkey | EmbeddedValkeyCluster | None = None,
    ) -> None:
        """`valkey`: a server (or local cluster) of the caller's to run on, with its ACL users;
        started if it is not running, left running at stop()."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access = access
        self.replicas = dict.fromkeys(STAGES, 1) | (replicas or {})
        self._owns_valkey = valkey is None
        self.valkey = valkey or (
            EmbeddedValkey(self.workdir / "valkey", namespace=settings.namespace) if embedded else None
        )
        self.gateway = gateway  # False: workers only, fed by the caller (a replay)
        # The audit archive: the settings' own, else the embedded SeaweedFS; archive=False runs
        # without an archiver (nothing is then held back for it).
        self.s3 = EmbeddedS3(self.workdir / "archive") if archive and not settings.archive_url else None
        self.archive_keys_file = settings.archive_keys_file
        if not archive:
            self.replicas["archiver"] = 0
        elif not self.archive_keys_file:
            self.archive_keys_file = str(self.workdir / "archive-keys.yaml")
            tenants = sorted({s.get("tenant") or "default" for s in access.get("stores", {}).values()} | {"default"})
            ArchiveKeys.generate(tenants).write(Path(self.archive_keys_file))
        cameras_file = self.workdir / "cameras.yaml"
        write_private(cameras_file, yaml.safe_dump(access))  # camera and backend tokens
        self.keys_dir = self.workdir / "keys"
        trusted_file = keys.generate(self.keys_dir)
        self.settings = settings.replace(
            cameras_file=str(cameras_file),
            grpc_address=f"127.0.0.1:{free_port()}",
            signing_key=settings.signing_key or secrets.token_hex(32),
            operator_token=settings.operator_token or secrets.token_hex(16),
            key_file="",
            trusted_keys_file=str(trusted_file),
            operator_key_file=str(self.keys_dir / "operator.key"),
            archive_keys_file="",  # the archiver's alone: archive_env()
            gallery_url=settings.gallery_url
            if "://./" not in settings.gallery_url
            else f"edge://{self.workdir / 'gallery'}",
        )
        self.settings = with_local_tls(self.settings, self.workdir / "tls")
        self.processes: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}
        self._s3_starting: Future[EmbeddedS3] | None = None

    @property
    def address(self) -> str:
        return self.settings.grpc_address

    @property
    def tls(self) -> ClientTLS | None:
        return ClientTLS.from_settings(self.settings)

    def channel(self) -> grpc.Channel:
        """A channel to this pipeline's gateway (TLS, with the pipeline's own CA)."""
        return client_channel(self.address, self.tls)

    def start(self, timeout_s: float = 120.0) -> Pipeline:
        """Starts every server and process, and waits until all are ready. If any of it fails,
        what had started is stopped before the error is raised: a failed start leaves no
        Valkey, SeaweedFS or worker running (a `with` block never reaches __exit__ then)."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        if self.valkey:
            self.valkey.start()
            self.settings = self.settings.replace(redis_url=self.valkey.url)
        if self.s3:  # starts (≈4 s) while the workers load their models; the archiver waits for it
            self.settings = self.settings.replace(archive_url=f"{self.s3.url}/{ARCHIVE_BUCKET}")
            self._s3_starting = ThreadPoolExecutor(1).submit(self.s3.start)
        if self.gateway:
            self._spawn("gateway", ["gateway"])
        for stage, count in self.replicas.items():
            if stage != "archiver":
                self._spawn_replicas(stage, count)
        if self._s3_starting:
            self._s3_starting.result(timeout_s)
        self._spawn_replicas("archiver", self.replicas.get("archiver", 0))
        self._wait_healthy(timeout_s)

    def _spawn_replicas(self, stage: str, count: int) -> None:
        for i in range(count):
            self._spawn(f"{stage}-{i}", ["worker", stage])

    def process_env(self, name: str) -> dict[str, str]:
        """The environment of process `name` ("gateway", "detector-0", …)."""
        self.metrics_ports.setdefault(name, free_port())
        # The archive's keys and credentials reach the archiver only, even if this shell has them.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FACEPAY_ARCHIVE_"))}
        env = {
            **inherited,
            **settings_to_env(self.settings),
            "FACEPAY_CONSUMER": name,
            "FACEPAY_METRICS_PORT": str(self.metrics_ports[name]),
        }
        component = name.rsplit("-", 1)[0]
        env = component_secrets(env, component, self.valkey, self.keys_dir)
        if component == "archiver":
            env.update(self.archive_env())
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        env = self.process_env(name)
        with open(self.workdir / f"{name}.log", "ab") as log_file:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "facepay", *args],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals go to the supervisor, which stops children in order
            )

    def archive_env(self) -> dict[str, str]:
        """What only the archiver (and an auditor) gets: the archive's keys and credentials."""
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FACEPAY_ARCHIVE_SIGNING_KEY"))}
        env["FACEPAY_ARCHIVE_KEYS_FILE"] = self.archive_keys_file
        if self.s3 and self.s3.credentials:
            env |= {
                "AWS_ACCESS_KEY_ID": self.s3.credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.s3.credentials.secret_access_key,
            }
        return env

    def _wait_healthy(self, timeout_s: float) -> None:
        """The gateway answers health checks and every worker has joined its consumer group."""

        deadline = time.monotonic() + timeout_s
        client = connect(self.settings.redis_url)
        if not self.gateway:
            while time.monotonic() < deadline:
                self._check_alive()
                if self._workers_ready(client):
                    return
                time.sleep(0.2)
            raise TimeoutError(f"workers not ready after {timeout_s}s; logs in {self.workdir}")
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    serving = (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    )
                except grpc.RpcError:
                    serving = False
                if serving and self._workers_ready(client):
                    return
                time.sleep(0.2)
        raise TimeoutError(f"pipeline not ready after {timeout_s}s; logs in {self.workdir}")

    def _workers_ready(self, client) -> bool:
        ready = client.smembers(self.settings.key("workers", "ready"))
        wanted = {n for n in self.processes if n != "gateway"}
        return wanted <= {r.decode() for r in ready}

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def kill(self, name: str) -> None:
        """SIGKILL one process, as a crash or an OOM kill would."""
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait()

    def respawn(self, name: str) -> None:
        stage = name.rsplit("-", 1)[0]
        self._spawn(name, ["gateway"] if name == "gateway" else ["worker", stage])

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.valkey and self._owns_valkey:
            self.valkey.stop()
        if self._s3_starting:  # a start that failed early: let the S3 start end, then stop it
            wait([self._s3_starting])
            self._s3_starting = None
        if self.s3:
            self.s3.stop(grace_s=0.5)  # objects are fsynced before acknowledged: nothing to wait for

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
