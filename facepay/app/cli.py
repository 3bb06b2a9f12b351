"""`facepay` command line: demo, gateway, worker, models, enroll, keys, audit, replay, config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from facepay.config import SettingsError, load_settings
from facepay.vocabulary import EnrollmentStatus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="facepay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults and pay with sample faces")
    demo.add_argument(
        "--enroll",
        help="folder with one sub-folder of photos per person (default: the test data, else a built-in face)",
    )
    demo.add_argument(
        "--camera", action="append", help="folder of photos or a video file to play as one session (repeatable)"
    )
    demo.add_argument("--workdir", default="var/demo", help="where Valkey, the gallery and logs live")
    demo.add_argument(
        "--keep-running", action="store_true", help="after the scripted sessions, keep serving until Ctrl-C"
    )
    demo.add_argument(
        "--relax-liveness",
        action="store_true",
        help="with your own --camera files: switch the blink rule off (a still photo cannot blink); every rule runs otherwise",
    )

    sub.add_parser("gateway", help="serve the gRPC gateway")
    worker = sub.add_parser("worker", help="run one stage worker")
    worker.add_argument("stage", choices=["detector", "aligner", "pose", "recognizer", "archiver"])

    models = sub.add_parser("models", help="pretrained weights in the model cache")
    models.add_argument("action", choices=["fetch", "list", "verify"])

    enroll = sub.add_parser(
        "enroll", help="enroll a user from photos, or a folder tree (one folder per user) as rq jobs"
    )
    who = enroll.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id (with --images)")
    who.add_argument("--tree", help="folder with one sub-folder of photos per user, named by user id")
    enroll.add_argument("--images", help="folder of photos of --user")
    enroll.add_argument("--tenant", default="default")
    enroll.add_argument("--phone-suffix", default="")
    enroll.add_argument(
        "--workers",
        type=int,
        default=1,
        help="rq workers to run here for --tree (0: external `rq worker facepay-enroll`)",
    )

    calibrate = sub.add_parser(
        "calibrate", help="FAR/FRR over a labelled folder tree; store the threshold for a target FAR"
    )
    calibrate.add_argument(
        "--data", required=True, help="folder with identities/<person>/<photos> (or <person>/<photos>)"
    )
    calibrate.add_argument("--target-far", type=float, default=1e-5)
    calibrate.add_argument("--out", default="var/calibration", help="report.json, report.md, det.png, roc.png")
    calibrate.add_argument("--no-store", action="store_true", help="report only; do not store the threshold in Redis")
    calibrate.add_argument(
        "--sessions",
        action="store_true",
        help="session mode: run the real session rule over enrolled/genuine/stranger photo sessions, "
        "choose threshold x margin x k, store that policy for the template space",
    )
    calibrate.add_argument(
        "--enrol", type=int, default=3, help="--sessions: photos per enrolled person (mean template)"
    )
    calibrate.add_argument("--frames", type=int, default=3, help="--sessions: photos per session")
    calibrate.add_argument(
        "--folds", type=int, default=5, help="--sessions: stranger folds (each person left out once)"
    )
    calibrate.add_argument(
        "--cache", help="embedding cache (.npz; biometric data: keep it private), reused for the same files and models"
    )

    reindex = sub.add_parser("reindex", help="re-embed every enrolled user under another recognizer model (rq jobs)")
    reindex.add_argument("--model", required=True, help="e.g. faceres-hse-v1, onnx:/path/model.onnx")
    reindex.add_argument(
        "--workers", type=int, default=1, help="rq workers to run here (0: external `rq worker facepay-reindex`)"
    )

    users = sub.add_parser("users", help="enrolled users (answered by the recognizer that owns the gallery)")
    users.add_argument("action", choices=["list", "show", "delete"])
    users.add_argument("user_id", nargs="?")
    users.add_argument("--tenant", default="")

    lockouts = sub.add_parser("lockouts", help="failure limits (NIST SP 800-63B)")
    lockouts.add_argument("action", choices=["reset"])
    target = lockouts.add_mutually_exclusive_group(required=True)
    target.add_argument("--camera")
    target.add_argument("--user")

    keys = sub.add_parser("keys", help="Ed25519 keys that authenticate every message (one per component)")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--out", required=True, help="folder for <component>.key (0600) files and trusted.yaml")

    redis_cmd = sub.add_parser("redis", help="Redis/Valkey set-up for a managed server")
    redis_cmd.add_argument("action", choices=["acl"], help="print ACL SETUSER lines, one user per component")
    redis_cmd.add_argument("--namespace", help="key prefix (default: FACEPAY_NAMESPACE)")
    redis_cmd.add_argument(
        "--out",
        default="var/redis-credentials",
        help="folder for the generated <component>.password files (0600; kept if present)",
    )
    redis_cmd.add_argument(
        "--acl-file",
        help="also write an ACL file (0600; `user default off` and the same users) "
        "for a Valkey/Redis started with `aclfile`, as the Kubernetes dev overlay's",
    )

    audit = sub.add_parser(
        "audit",
        help="the audit archive: list archived sessions, verify the stores' hash chains, "
        "sweep by retention, erase a user's frames",
    )
    audit.add_argument("action", choices=["list", "verify", "sweep", "erase"])
    audit.add_argument("--user", help="erase: the user whose approved sessions lose their frames")
    audit.add_argument("--retention-days", type=int, help="sweep: override FACEPAY_ARCHIVE_RETENTION_DAYS")
    audit.add_argument("--store", help="one store (default: every store in the archive)")
    audit.add_argument("--tenant", help="one tenant (default: every tenant)")
    audit.add_argument(
        "--from", dest="start", help="ISO 8601 (UTC) or how long ago: 24h, 7d, 30m (default: 24 h before --to)"
    )
    audit.add_argument("--to", dest="end", help="ISO 8601 (UTC) or relative (default: now)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")

    replay = sub.add_parser(
        "replay",
        help="run archived sessions again through the real stages in an isolated namespace; "
        "report what is decided today and why it differs",
    )
    replay.add_argument("--from", dest="start", required=True, help="ISO 8601 (UTC) or how long ago: 24h, 7d")
    replay.add_argument("--to", dest="end", help="ISO 8601 (UTC) or how long ago (default: now)")
    replay.add_argument("--store")
    replay.add_argument("--tenant")
    replay.add_argument("--camera")
    replay.add_argument("--session")
    replay.add_argument("--model", help="recognizer model to replay with (default: today's, FACEPAY_RECOGNIZER_MODEL)")
    replay.add_argument("--threshold", type=float, help="cosine threshold (default: the archived sessions' own)")
    replay.add_argument("--out", default="var/replay", help="report.json and report.html")

    config = sub.add_parser("config", help="settings")
    config.add_argument("action", choices=["show"])
    contract = sub.add_parser("contract", help="the gRPC contract")
    contract.add_argument("action", choices=["build"])
    # Not forced by default: an installed package ships its generated code and may sit on a
    # read-only file system, where `build` only checks it is current.
    contract.add_argument("--force", action="store_true", help="regenerate even when up to date")

    args = parser.parse_args(argv)
    handler = globals()[f"_cmd_{args.command}"]
    from facepay.keys import KeyFileError

    try:
        sys.exit(handler(args) or 0)
    except SettingsError as exc:  # a configuration mistake is the operator's to fix: no traceback
        parser.exit(2, f"facepay: configuration error: {exc}\n")
    except KeyFileError as exc:  # a missing or wrong key is a set-up error, not a crash
        sys.exit(f"facepay {args.command}: {exc}")


@contextmanager
def progress_bar(desc: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar = tqdm(unit=unit, desc=desc)

    def update(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _settings():
    from facepay.logs import setup_logging

    settings = load_settings()
    setup_logging(settings.log_format)
    return settings


def _cmd_gateway(args) -> int:
    from facepay.runtime.metrics import serve_metrics
    from services.gateway.cameras import CameraRegistry
    from services.gateway.server import serve

    settings = _settings()
    if not settings.cameras_file:
        raise SystemExit("set FACEPAY_CAMERAS_FILE to the YAML file of stores, cameras and tokens (see README)")
    serve_metrics(settings.metrics_port, settings.metrics_address)
    server = serve(settings, CameraRegistry.from_file(settings.cameras_file))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.drain().wait()  # NOT_SERVING, serve on for grpc_drain_s, stop with grpc_stop_grace_s
    return 0


def _cmd_worker(args) -> int:
    from facepay.app.stages import create_stage
    from facepay.models.errors import DeviceUnavailableError
    from facepay.runtime.metrics import serve_metrics
    from facepay.runtime.startup import DependencyUnavailable
    from facepay.runtime.worker import StreamWorker

    settings = _settings()
    serve_metrics(settings.metrics_port, settings.metrics_address)
    try:
        stage = create_stage(args.stage, settings)
        if stage.uses_device:  # only the model stages load torch (≈1.5 s of CPU at every start)
            import torch

            torch.set_num_threads(settings.worker_threads)
        StreamWorker(stage, settings).run()
    except (DeviceUnavailableError, DependencyUnavailable) as exc:  # the deployment's to fix: one clear line
        sys.exit(f"facepay worker {args.stage}: {exc}")
    return 0


def _cmd_models(args) -> int:
    from facepay.models import cache
    from facepay.models.registry import WEIGHTS

    if args.action == "fetch":
        cache.fetch(progress=lambda line: print(line, flush=True))
    # The use column says, before anything else, which weights must not run in a commercial deployment.
    rows = [
        (
            w.name,
            cache.status(w.name),
            f"{w.size / 1e6:.1f} MB",
            "NON-COMMERCIAL" if w.non_commercial else "commercial-ok",
            w.package,
            w.licence,
        )
        for w in WEIGHTS.values()
    ]
    for row in rows:
        print("  ".join(str(c) for c in row))
    return 0 if all(r[1] == "ok" for r in rows) or args.action == "list" else 1


def _cmd_enroll(args) -> int:
    from facepay.app.enrollment import enroll_images, enroll_tree, gateway_target, photos_in
    from facepay.app.jobs import queue_url
    from facepay.grpc_tls import ClientTLS

    settings = load_settings()
    target = gateway_target(settings.grpc_address)
    tls = ClientTLS.from_settings(settings)
    if args.user:
        if not args.images:
            raise SystemExit("--user needs --images DIR")
        images = [p.read_bytes() for p in photos_in(args.images)]
        if not images:
            raise SystemExit(f"no JPEG or PNG photos in {args.images}")
        results = [
            enroll_images(target, settings.operator_token, args.user, args.tenant, images, args.phone_suffix, tls=tls)
        ]
    else:
        with progress_bar("enrolling", "user") as progress:
            results = enroll_tree(
                queue_url(settings),
                args.tree,
                target,
                settings.operator_token,
                args.tenant,
                inline_workers=args.workers,
                progress=progress,
                tls=tls,
            )
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["status"] == EnrollmentStatus.ENROLLED for r in results) else 1


def _cmd_calibrate(args) -> int:
    from facepay import thresholds
    from facepay.app.calibration import calibrate
    from facepay.app.offline import FaceEmbedder
    from facepay.redaction import redact_url
    from facepay.runtime.redis_conn import connect
    from services.recognizer.embedder import template_space

    settings = load_settings()
    if not args.no_store:
        from facepay.keys import operator_keyring

        signer = operator_keyring(settings).signer  # before the long run: no key, no stored threshold
    if args.sessions:
        return _calibrate_sessions(args, settings, None if args.no_store else signer)
    with progress_bar("embedding", "image") as progress:
        report = calibrate(
            args.data,
            args.out,
            args.target_far,
            FaceEmbedder(settings, labelled=True),
            progress=progress,
            cache=args.cache,
        )
    print((Path(args.out) / "report.md").read_text())
    space = template_space(report.model_id, settings.landmarks_model)
    if not args.no_store:
        thresholds.store(
            connect(settings.redis_url),
            settings,
            space,
            report.threshold,
            signer,
            target_far=args.target_far,
            data=str(args.data),
            report=str(Path(args.out).resolve()),
        )
        print(
            f"stored threshold {report.threshold!r} for {space} in {redact_url(settings.redis_url)} (namespace {settings.namespace}); "
            "recognizers pick it up within a minute"
        )
    return 0


def _calibrate_sessions(args, settings, signer) -> int:
    from facepay import thresholds
    from facepay.app import session_calibration as sc
    from facepay.app.calibration import embedded_dataset
    from facepay.app.offline import FaceEmbedder
    from facepay.models.registry import recognizer_defaults
    from facepay.runtime.redis_conn import connect
    from services.recognizer.embedder import template_space

    embedder = FaceEmbedder(settings, labelled=True)
    model = embedder.embedder
    defaults = recognizer_defaults(model.model_id, model.default_threshold)
    if defaults.non_commercial or getattr(model, "non_commercial", False):
        print(f"NOTE: {getattr(model, 'licence_notice', defaults.licence)}", flush=True)
    with progress_bar("embedding", "image") as progress:
        data = embedded_dataset(args.data, embedder, cache=args.cache, progress=progress)
    design = sc.SessionDesign(enrol=args.enrol, frames=args.frames, folds=args.folds)
    shipped = (defaults.threshold, defaults.margin, defaults.min_agreeing_frames)
    report = sc.calibrate_sessions(data, model.model_id, design, at=[shipped])
    files = sc.write_report(report, args.out)
    print(Path(files["markdown"]).read_text())
    space = template_space(report.model_id, settings.landmarks_model)
    chosen = report.chosen
    if chosen is None:
        print("no policy approves no stranger session: nothing stored")
        return 1
    if signer is not None:
        thresholds.store(
            connect(settings.redis_url),
            settings,
            space,
            chosen.threshold,
            signer,
            margin=chosen.margin,
            min_agreeing_frames=chosen.k,
            mode="sessions",
            session_frr=chosen.frr.value,
            session_frr_upper80=chosen.frr.upper,
            session_far=chosen.far.value,
            session_far_upper80=chosen.far.upper,
            design=dataclasses.asdict(design),
            data=str(args.data),
            report=str(Path(args.out).resolve()),
        )
        print(
            f"stored threshold {chosen.threshold!r}, margin {chosen.margin!r}, k {chosen.k} for {space} in "
            f"{settings.redis_url} (namespace {settings.namespace}); recognizers pick it up within a minute"
        )
    return 0


def _cmd_reindex(args) -> int:
    from facepay.app.reindex import reindex

    with progress_bar("re-indexing", "user") as progress:
        results = reindex(load_settings(), args.model, args.workers, progress)
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["status"] == "reindexed" for r in results) else 1


def _cmd_users(args) -> int:
    from facepay.app.admin import call

    settings = load_settings()
    if args.action != "list" and not args.user_id:
        raise SystemExit(f"users {args.action} needs a user id")
    if args.action == "list":
        result = call(settings, "list_users", tenant=args.tenant)
    else:
        result = call(settings, f"{args.action}_user", user_id=args.user_id)
    if args.action == "delete" and settings.archive_url:
        result["archive"] = _erase_from_archive(settings, args.user_id, args.tenant)
    print(json.dumps(result, indent=2))
    return 0


def _erase_from_archive(settings, user_id: str, tenant: str) -> dict:
    """The gallery forgot the user; the archive drops the frames of the sessions that approved
    them (the signed decision events stay: README, Erasure). Needs the archive's keys."""
    from facepay.app import audit
    from facepay.archive import ArchiveError

    try:
        erased = audit.erase_user(audit.open_archive(settings), user_id, tenant or None)
    except (audit.AuditError, ArchiveError) as exc:
        print(
            f"facepay users delete: the archive was NOT erased: {exc}; run `facepay audit erase --user {user_id}`",
            file=sys.stderr,
        )
        return {"erased_sessions": None, "error": str(exc)}
    return {"erased_sessions": len(erased)}


def _cmd_lockouts(args) -> int:
    from facepay.app.admin import call

    kind, subject = ("camera", args.camera) if args.camera else ("user", args.user)
    print(json.dumps(call(load_settings(), "reset_lockout", kind=kind, subject=subject)))
    return 0


def _cmd_keys(args) -> int:
    from facepay.keys import COMPONENTS, generate

    trusted = generate(args.out)
    print(f"wrote {', '.join(f'{c}.key' for c in COMPONENTS)} (mode 0600) and {trusted.name} in {args.out}")
    print(
        "give each process only its own key: FACEPAY_KEY_FILE=<component>.key, FACEPAY_TRUSTED_KEYS_FILE="
        f"{trusted}; the CLI and rq workers: FACEPAY_OPERATOR_KEY_FILE=operator.key"
    )
    return 0


def _cmd_redis(args) -> int:
    from facepay import redis_acl
    from facepay.private_files import write_private

    namespace = args.namespace or load_settings().namespace
    passwords = redis_acl.load_or_create_passwords(Path(args.out), redis_acl.COMPONENTS)
    print(f"# facepay ACL users for namespace {namespace!r}; passwords in {args.out}/<component>.password (0600),")
    print("# only their SHA-256 below. Run as the server's administrator (redis-cli, or your provider's console).")
    for line in redis_acl.setuser_commands(namespace, passwords):
        print(line)
    if args.acl_file:
        write_private(Path(args.acl_file), redis_acl.acl_file_text(namespace, passwords))
        print(f"# ACL file (the same users, `default` off): {args.acl_file}")
    print("# Then give each process its own user: FACEPAY_REDIS_URL=redis[s]://<component>@host:port/0 and")
    print("# FACEPAY_REDIS_PASSWORD_FILE=<the component's .password file>. Once your own admin user works:")
    print("# ACL SETUSER default off")
    return 0


def _cmd_audit(args) -> int:
    """Exit 0: all clean; 1: verify found problems; 2: a bad option or no archive configured."""
    from dataclasses import asdict

    from facepay.app import audit

    try:
        start, end = audit.time_range(args.start, args.end)
        settings = load_settings()
        archive = audit.open_archive(settings)
        if args.action == "sweep":
            if args.retention_days is not None and args.retention_days < 1:
                raise audit.AuditError(f"--retention-days must be ≥ 1, got {args.retention_days}")
            report = audit.sweep(archive, args.retention_days)
            print(json.dumps(asdict(report)))
            return 0
        if args.action == "erase":
            if not args.user:
                raise audit.AuditError("erase needs --user")
            erased = audit.erase_user(archive, args.user, args.tenant)
            print(json.dumps({"user_id": args.user, "erased_sessions": erased}))
            return 0
        if args.action == "list":
            sessions = audit.list_sessions(archive, start, end, args.store, args.tenant)
            print(json.dumps([asdict(s) for s in sessions], indent=2) if args.json else audit.format_list(sessions))
            return 0
        reports = audit.verify(archive, start, end, args.store, args.tenant, settings.claim_idle_ms)
    except audit.AuditError as exc:
        print(f"facepay audit: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([audit.report_dict(r) for r in reports], indent=2) if args.json else audit.format_verify(reports))
    return 0 if all(r.ok for r in reports) else 1


def _cmd_replay(args) -> int:
    """Exit 0: every replayed decision equals the archived one; 1: some differ; 2: bad options."""
    from facepay.app import audit
    from facepay.app.replay import ReplayOptions, run_replay

    try:
        start, end = audit.time_range(args.start, args.end)
        if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
            raise audit.AuditError(f"--threshold must be a cosine in [-1, 1], got {args.threshold}")
        settings = load_settings()
        archive = audit.open_archive(settings)
        options = ReplayOptions(
            start, end, args.store, args.tenant, args.camera, args.session, args.model, args.threshold, Path(args.out)
        )
        report = run_replay(settings, archive, options)
    except audit.AuditError as exc:
        print(f"facepay replay: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report['replay']['sessions']} sessions replayed, {report['differences']} difference(s); "
        f"report: {Path(args.out) / 'report.html'}"
    )
    return 1 if report["differences"] else 0


def _cmd_config(args) -> int:
    print(json.dumps(load_settings().as_dict(), indent=2))
    return 0


def _cmd_contract(args) -> int:
    from facepay import contract

    print(contract.build(force=args.force))
    return 0


def _cmd_demo(args) -> int:
    from facepay.app.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    return run_demo(args)
