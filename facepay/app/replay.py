"""`facepay replay`: archived payment sessions run again through the real stage workers, in an
isolated namespace, and a report of what would be decided today and why it differs.

The replay namespace (`<namespace>-replay-<id>`, on an embedded Valkey of its own):
- its own streams, consumer groups, session state, decided-session keys and lockout counters,
  on a Redis server of its own (production's is never connected to: no memory taken there, no
  ACL user needed, nothing to clean up), deleted when the replay ends;
- its own keyset (`facepay keys generate` into the replay's folder): the injector signs frames
  as the replay's gateway, the replay's stages sign with their replay keys, and its recognizer
  signs decisions under a fresh HMAC key with key id `replay-<id>`. No production key is read,
  so nothing the replay writes can pass for production's, and production's stages (which trust
  only production's public keys) would refuse it even if it reached their streams;
- a read-only view of the gallery: an embedded gallery (edge://, qdrant+local://) is copied
  into the replay's folder (the copy is thrown away); a Qdrant server is searched, never
  written (a replay sends no enrollment and no admin command; give it a read-only API key);
- `max_frame_age_s` of 20 years: archived frames are old by design; the recognizer's replay
  bound protects live traffic, and replay frames are signed by the replay's own gateway key,
  which production does not trust;
- failure limits off (10⁹): lockouts depend on history the replay does not have; a session the
  original locked out is reported with that cause;
- the rule in force: the archived policy and threshold (the most recent session's) unless
  `--threshold`; today's recognizer model unless `--model`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import secrets
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import redis

from facepay import keys as component_keys
from facepay.app.audit import stores_of
from facepay.app.supervisor import Pipeline
from facepay.archive import ArchivedSession, ArchiveStore, Candidate
from facepay.config import FailureLimits, SessionPolicy, Settings
from facepay.messages import FIELD, DecisionMsg, FrameMsg, FrameRef, SessionEndMsg, decode
from facepay.runtime.envelope import attest, open_entry, seal
from facepay.runtime.partitions import Partitions
from facepay.signing import verify
from facepay.vocabulary import Reason

log = logging.getLogger(__name__)

REPLAY_MAX_FRAME_AGE_S = 20 * 365 * 24 * 3600
NO_LIMIT = 10**9
SESSION_DECIDE_S = 30.0  # per session, on top of a minute: how long the replay waits for decisions


@dataclass(frozen=True)
class ReplayOptions:
    start: datetime
    end: datetime
    store: str | None = None
    tenant: str | None = None
    camera: str | None = None
    session: str | None = None
    model: str | None = None
    threshold: float | None = None
    out: Path = Path("var/replay")


@dataclass
class SessionReport:
    session_id: str
    tenant: str
    store: str
    camera: str
    decided_at_ms: int
    original: dict  # the archived signed event's fields
    replayed: dict | None  # the replay's event, None if it did not decide
    frames: list[dict] = field(default_factory=list)  # per frame: index, original and replayed scores, thumbnail
    differs: bool = False
    causes: list[str] = field(default_factory=list)


# ---- choosing sessions ---------------------------------------------------------------------
def select_sessions(archive: ArchiveStore, options: ReplayOptions) -> list[ArchivedSession]:
    chosen = []
    for tenant, store in stores_of(archive, options.store, options.tenant):
        for ref in archive.list_sessions(tenant, store, options.start, options.end):
            if options.session and ref.session_id != options.session:
                continue
            session = archive.read(ref.key)
            if options.camera and session.camera != options.camera:
                continue
            chosen.append(session)
    return chosen


# ---- the isolated namespace ----------------------------------------------------------------
def replay_settings(
    production: Settings, workdir: Path, sessions: list[ArchivedSession], options: ReplayOptions
) -> Settings:
    replay_id = uuid.uuid4().hex[:8]
    latest = max(sessions, key=lambda s: s.decided_ms) if sessions else None
    policy = production.policy
    if latest and latest.policy:
        known = set(SessionPolicy.__dataclass_fields__)
        policy = SessionPolicy(**{k: v for k, v in latest.policy.items() if k in known})
    threshold = options.threshold if options.threshold is not None else (latest.threshold if latest else None)
    policy = SessionPolicy(**{**asdict(policy), "threshold": threshold})
    return production.replace(
        namespace=f"{production.namespace}-replay-{replay_id}",
        gallery_url=_gallery_view(production.gallery_url, workdir / "gallery"),
        recognizer_model=options.model or production.recognizer_model,
        policy=policy,
        limits=FailureLimits(max_consecutive=NO_LIMIT, hard_limit=NO_LIMIT),
        max_frame_age_s=REPLAY_MAX_FRAME_AGE_S,
        signing_key="",
        signing_key_id=f"replay-{replay_id}",  # Pipeline makes a fresh key
        key_file="",
        trusted_keys_file="",
        operator_key_file="",
        operator_token="",
        archive_url="",
        archive_keys_file="",
        cameras_file="",
        metrics_port=0,
    )


def _gallery_view(url: str, copy_to: Path) -> str:
    """A read-only view: embedded galleries are copied (the copy is discarded)."""
    for scheme in ("edge://", "qdrant+local://"):
        if url.startswith(scheme):
            source = Path(url[len(scheme) :])
            if source.exists():
                shutil.copytree(source, copy_to, ignore=shutil.ignore_patterns("*.lock", ".lock"))
            return f"{scheme}{copy_to}"
    return url


def _delete_namespace(client: redis.Redis, namespace: str) -> int:
    deleted = 0
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        deleted += client.unlink(key)
    return deleted


# ---- running ------------------------------------------------------------------------------
class ReplayRun:
    """Workers of the replay namespace, the injector (the replay's gateway) and the collector."""

    def __init__(self, settings: Settings, workdir: Path, replicas: dict[str, int] | None = None) -> None:
        # Its own embedded Valkey: production's Redis is not even connected to (no memory, no
        # ACL user, no key of the replay there); the namespace names the replay in logs too.
        self.pipeline = Pipeline(
            settings,
            workdir,
            access={"stores": {}, "cameras": {}},
            replicas=replicas,
            embedded=True,
            archive=False,
            gateway=False,
        )
        self.settings = self.pipeline.settings
        self.gateway = component_keys.load_signer(str(self.pipeline.keys_dir / "gateway.key"))
        self.trusted = component_keys.load_trusted(self.settings.trusted_keys_file)

    def start(self, timeout_s: float = 300.0) -> ReplayRun:
        self.pipeline.start(timeout_s)
        self.settings = self.pipeline.settings  # with the embedded Valkey's address
        self.client = redis.Redis.from_url(self.settings.redis_url)
        return self

    def stop(self) -> None:
        if hasattr(self, "client"):
            _delete_namespace(self.client, self.settings.namespace)
        self.pipeline.stop()
        shutil.rmtree(self.pipeline.workdir / "valkey", ignore_errors=True)  # the replayed frames' copy

    def inject(self, session: ArchivedSession) -> None:
        """The archived frames, as the replay's gateway would queue them."""
        stream = Partitions.of(self.settings).stream("frames", f"{session.store}/{session.session_id}")
        frames = [f for f in session.frames if f.image]
        for frame in frames:
            # As received: the camera's capture time, the phone suffix the search was filtered by.
            ref = FrameRef(
                session.session_id,
                session.store,
                session.camera,
                frame.index,
                frame.captured_ms or frame.received_ms,
                tenant_id=session.tenant,
                phone_suffix=frame.phone_suffix,
                trace_id=f"replay-{uuid.uuid4().hex[:8]}",
                received_ms=frame.received_ms,
            )
            message = FrameMsg(ref=attest(ref, self.gateway, frame.image), image=frame.image)
            self.client.xadd(stream, seal({FIELD: message.encode()}, stream, self.gateway))
        end = attest(
            FrameRef(
                session.session_id,
                session.store,
                session.camera,
                -1,
                0,
                tenant_id=session.tenant,
                received_ms=max((f.received_ms for f in frames), default=0),
            ),
            self.gateway,
        )
        self.client.xadd(
            stream, seal({FIELD: SessionEndMsg(ref=end, frame_count=len(frames)).encode()}, stream, self.gateway)
        )

    def decisions(self) -> dict[tuple[str, str], tuple[dict, DecisionMsg]]:
        """(store, session) → (the verified event, the recognizer's decision record) of every
        decision so far: the records (`{ns}:decision-records`) carry the event as signed and
        each frame's users and scores."""
        keys = {self.settings.signing_key_id: self.settings.signing_key}
        found = {}
        for stream, fields in (
            (s, f) for s in Partitions.of(self.settings).streams("decision-records") for _, f in self.client.xrange(s)
        ):
            _, body = open_entry(fields, stream, self.trusted, {"recognizer"})
            message = decode(body)
            if not isinstance(message, DecisionMsg):
                continue
            event = verify(message.payload, message.signature, message.key_id, keys)
            found[(event["store_id"], event["session_id"])] = (event, message)
        return found

    def wait_for(self, wanted: set[tuple[str, str]], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.decisions()
            if wanted <= set(found) or time.monotonic() > deadline:
                return found
            self.pipeline._check_alive()
            time.sleep(0.3)


# ---- explaining ---------------------------------------------------------------------------
def explain(
    session: ArchivedSession, replayed: dict | None, replayed_frames: list[dict], gallery_users: set[str] | None
) -> list[str]:
    """The causes of a difference between the archived decision and the replayed one."""
    original = session.decision.fields
    causes = []
    if replayed is None:
        return ["not decided in the replay"]
    if any(not f.image for f in session.frames):
        causes.append("frame missing (erased, or never reached the archiver)")
    old_models, new_models = session.models, replayed.get("model_ids") or {}
    changed = sorted(k for k in set(old_models) | set(new_models) if old_models.get(k) != new_models.get(k))
    if changed:
        causes.append("model changed: " + ", ".join(f"{k} {old_models.get(k)} → {new_models.get(k)}" for k in changed))
    if abs(float(original.get("threshold", 0)) - float(replayed.get("threshold", 0))) > 1e-6:
        causes.append(f"threshold changed: {original.get('threshold')} → {replayed.get('threshold')}")
    # The replay runs every session under one rule (the latest archived one's): a session decided
    # under an earlier margin or k is explained by it.
    rule = [
        f"{k} {original[k]} → {replayed[k]}"
        for k in ("margin", "min_agreeing_frames")
        if k in original and k in replayed and original[k] != replayed[k]
    ]
    if rule:
        causes.append("session rule changed: " + ", ".join(rule))
    before, now = original.get("user_id") or "", replayed.get("user_id") or ""
    if before and gallery_users is not None and before not in gallery_users:
        causes.append(f"user deleted since: {before}")
    archived_candidates = {c.user_id for f in session.frames for c in f.top_k}
    top_now: set[str] = {f["top_user"] for f in replayed_frames if f.get("top_user")}
    # A runner-up moves the margin. A new one is someone enrolled since only where the archived
    # frame says who its runner-up was, or that it had none (older archives: its score only).
    knew_runner_up = {f.index for f in session.frames if len(f.top_k) > 1 or f.second_score == -1.0}
    top_now |= {
        f["second_user"] for f in replayed_frames if f.get("second_user") and f.get("sequence") in knew_runner_up
    }
    enrolled_since = sorted((top_now | ({now} if now else set())) - archived_candidates - {before})
    if enrolled_since:
        causes.append("user enrolled since: " + ", ".join(enrolled_since))
    if original.get("rule") == Reason.LOCKED_OUT:
        causes.append("lockout (failure counters are not replayed)")
    if not causes:
        causes.append("unexplained: same models, threshold and gallery")
    return causes


def differs(original: dict, replayed: dict | None) -> bool:
    if replayed is None:
        return True
    return (original.get("decision"), original.get("user_id") or "") != (
        replayed.get("decision"),
        replayed.get("user_id") or "",
    )


def _thumbnail(image: bytes, height: int = 96) -> str:
    import cv2
    import numpy as np

    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR) if image else None
    if decoded is None:
        return ""
    scale = height / decoded.shape[0]
    small = cv2.resize(decoded, (max(1, int(decoded.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
    return (
        "data:image/jpeg;base64,"
        + base64.b64encode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()).decode()
    )


def _listed(candidates: list[Candidate]) -> list[dict]:
    return [{"user_id": c.user_id, "score": c.score} for c in candidates]


def session_report(
    session: ArchivedSession, replayed: tuple[dict, DecisionMsg] | None, gallery_users: set[str] | None
) -> SessionReport:
    event, message = replayed if replayed else (None, None)
    replayed_frames = {f["sequence"]: f for f in (message.frames if message else [])}
    frames = []
    for frame in session.frames:
        now = replayed_frames.get(frame.index, {})
        frames.append(
            {
                "index": frame.index,
                "image": "present" if frame.image else "missing",
                "original_top": _listed(frame.top_k),
                "original_second": frame.second_score,
                "original_rejection": frame.rejection,
                "replayed_top": _listed(Candidate.top_two(now)),
                "replayed_second": now.get("second_score"),
                "replayed_rejection": now.get("reason") or None,
                "thumbnail": _thumbnail(frame.image),
            }
        )
    original = session.decision.fields
    report = SessionReport(
        session.session_id,
        session.tenant,
        session.store,
        session.camera,
        session.decided_ms,
        original,
        event,
        frames,
        differs(original, event),
    )
    if report.differs:
        report.causes = explain(session, event, list(replayed_frames.values()), gallery_users)
    return report


def _gallery_users(settings: Settings, spaces: set[str], tenants: set[str]) -> set[str] | None:
    from facepay.gallery import open_gallery

    try:
        gallery = open_gallery(settings.gallery_url, tuning=settings.qdrant)
    except Exception:
        log.warning("replay gallery not readable for the report", exc_info=True)
        return None
    try:
        return {u for space in spaces for t in tenants for u in gallery.list_users(space, t or None)}
    except Exception:
        log.warning("replay gallery not listable for the report", exc_info=True)
        return None
    finally:
        gallery.close()


# ---- the whole command ----------------------------------------------------------------------
def run_replay(
    production: Settings, archive: ArchiveStore, options: ReplayOptions, replicas: dict[str, int] | None = None
) -> dict:
    """Replay the chosen sessions; write report.json and report.html into options.out; return the report."""
    started = time.monotonic()
    sessions = select_sessions(archive, options)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / f"work-{secrets.token_hex(4)}"
    settings = replay_settings(production, workdir, sessions, options)
    run = ReplayRun(settings, workdir, replicas)
    found: dict = {}
    timings: dict[str, float] = {"sessions": len(sessions), "frames": sum(len(s.frames) for s in sessions)}
    try:
        if sessions:
            run.start()
            timings["workers_ready_s"] = round(time.monotonic() - started, 2)
            injected = time.monotonic()
            for session in sessions:
                run.inject(session)
            wanted = {(s.store, s.session_id) for s in sessions}
            found = run.wait_for(wanted, 60 + SESSION_DECIDE_S * len(sessions))
            timings["replay_s"] = round(time.monotonic() - injected, 2)
    finally:
        run.stop()
        shutil.rmtree(workdir / "keys", ignore_errors=True)  # the replay's keys die with it
    spaces = {e.get("template_space", "") for e, _ in found.values()} - {""}
    users = _gallery_users(run.settings, spaces, {s.tenant for s in sessions}) if spaces else None
    shutil.rmtree(workdir / "gallery", ignore_errors=True)
    reports = [session_report(s, found.get((s.store, s.session_id)), users) for s in sessions]
    report = {
        "replay": {
            "namespace": run.settings.namespace,
            "key_id": run.settings.signing_key_id,
            "from": options.start.isoformat(),
            "to": options.end.isoformat(),
            "store": options.store,
            "camera": options.camera,
            "session": options.session,
            "model": run.settings.recognizer_model,
            "threshold": run.settings.policy.threshold,
            **timings,
        },
        "sessions": [asdict(r) for r in reports],
        "differences": sum(r.differs for r in reports),
    }
    (out / "report.json").write_text(json.dumps(_without_thumbnails(report), indent=2, default=str))
    (out / "report.html").write_text(render_html(report))
    return report


def _without_thumbnails(report: dict) -> dict:
    copy = json.loads(json.dumps(report, default=str))
    for session in copy["sessions"]:
        for frame in session["frames"]:
            frame.pop("thumbnail", None)
    return copy


def _verdict(e: dict) -> str:
    return (
        f"{e.get('decision', 'none')} {e.get('user_id') or ''} ({e.get('score', '')} vs {e.get('threshold', '')}, "
        f"rule {e.get('rule', '')})"
    )


def render_html(report: dict) -> str:
    esc = html.escape
    meta = report["replay"]
    rows = []
    for s in report["sessions"]:
        o, r = s["original"], s["replayed"] or {}
        frames = "".join(
            f"<figure>{_picture(f)}<figcaption>#{f['index']} "
            f"{esc(_scores(f['original_top'], f.get('original_second'), f['original_rejection']))} → "
            f"{esc(_scores(f['replayed_top'], f.get('replayed_second'), f['replayed_rejection']))}</figcaption></figure>"
            for f in s["frames"]
        )
        rows.append(
            f'<section class="{"diff" if s["differs"] else "same"}"><h2>{esc(s["store"])} / {esc(s["session_id"])} '
            f"<small>camera {esc(s['camera'])}</small></h2>"
            f"<table><tr><th>original</th><td>{esc(_verdict(o))}</td></tr>"
            f"<tr><th>replayed</th><td>{esc(_verdict(r)) if r else 'not decided'}</td></tr>"
            + (f"<tr><th>causes</th><td>{esc('; '.join(s['causes']))}</td></tr>" if s["differs"] else "")
            + f'</table><div class="frames">{frames}</div></section>'
        )
    return f"""<!doctype html><meta charset="utf-8"><title>facepay replay</title>
<style>body{{font-family:sans-serif;margin:2em}} section{{border-left:6px solid #4a4;padding:0 1em;margin:1em 0}}
section.diff{{border-color:#c33}} figure{{display:inline-block;margin:4px;font-size:11px;max-width:160px}}
th{{text-align:left;padding-right:1em}}</style>
<h1>Replay {esc(meta["namespace"])}</h1>
<p>{meta["sessions"]} sessions, {meta["frames"]} frames, {report["differences"]} difference(s);
model {esc(str(meta["model"]))}, threshold {esc(str(meta["threshold"]))}; {esc(meta["from"])} → {esc(meta["to"])}.
Frame captions: original top user and score (second-best user and score: the margin rule) → replayed.</p>
{"".join(rows)}"""


def _picture(frame: dict) -> str:
    if frame["thumbnail"]:
        return f'<img src="{frame["thumbnail"]}" alt="frame {frame["index"]}">'
    return "<p>frame missing</p>" if frame["image"] == "missing" else "<p>image unreadable</p>"


def _scores(top: list[dict], second: float | None, rejection: str | None) -> str:
    if top:
        runner_up = ""
        if len(top) > 1:
            runner_up = f" (2nd {top[1]['user_id']} {top[1]['score']:.3f})"
        elif second is not None and second > -1:  # archived before the runner-up was named
            runner_up = f" (2nd {second:.3f})"
        return f"{top[0]['user_id']} {top[0]['score']:.3f}{runner_up}"
    return rejection or "-"
