"""`facepay audit list|verify`: the audit archive seen from the operator's side.

Application layer over `facepay.archive.ArchiveStore`: which archive (settings), which tenants
and stores (all, or the ones asked for), which time range (`--from`/`--to`: ISO 8601 in UTC, or
relative to now like `24h`, `7d`, `30m` (ago; `--from=-24h` also works); default the last 24 hours).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from facepay.archive import ArchiveSettings, ArchiveStore, Problem, SweepReport, VerifyReport, in_flight_window
from facepay.config import Settings

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhd])$")  # "24h" or "-24h": that long ago
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class AuditError(ValueError):
    """A bad option (time, store) or an archive that is not configured: a clear message, exit 2."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise AuditError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-29T06:00, UTC unless an offset is given) "
            "or a time before now like 24h, 7d, 30m (ago)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def time_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    to = parse_time(end, now) if end else now
    begin = parse_time(start, now) if start else to - timedelta(hours=24)
    if begin >= to:
        raise AuditError(f"--from ({begin.isoformat()}) must be before --to ({to.isoformat()})")
    return begin, to


def open_archive(settings: Settings) -> ArchiveStore:
    if not settings.archive_url:
        raise AuditError(
            "FACEPAY_ARCHIVE_URL is not set: which archive? (s3://bucket[/prefix] or http(s)://host:port/bucket)"
        )
    if not settings.archive_keys_file:
        raise AuditError("FACEPAY_ARCHIVE_KEYS_FILE is not set: verifying needs the archive signing key")
    return ArchiveStore.from_settings(ArchiveSettings.from_facepay(settings))


def stores_of(archive: ArchiveStore, store: str | None = None, tenant: str | None = None) -> list[tuple[str, str]]:
    """(tenant, store) pairs in the archive, narrowed to the ones asked for."""
    pairs = [(t, s) for t in ([tenant] if tenant else archive.tenants()) for s in archive.stores(t)]
    if store:
        pairs = [(t, s) for t, s in pairs if s == store]
        if not pairs:
            raise AuditError(f"store {store!r} has no archived sessions{f' for tenant {tenant!r}' if tenant else ''}")
    return pairs


@dataclass(frozen=True)
class ListedSession:
    tenant: str
    store: str
    session_id: str
    decided_at: str
    decision: str
    user_id: str
    rule: str
    key: str


def list_sessions(
    archive: ArchiveStore, start: datetime, end: datetime, store: str | None = None, tenant: str | None = None
) -> list[ListedSession]:
    listed = []
    for tenant_id, store_id in stores_of(archive, store, tenant):
        for ref in archive.list_sessions(tenant_id, store_id, start, end):
            event = json.loads(archive.read_header(ref.key)["decision"]["payload"])
            listed.append(
                ListedSession(
                    tenant_id,
                    store_id,
                    ref.session_id,
                    datetime.fromtimestamp(ref.decided_ms / 1000, UTC).isoformat(timespec="milliseconds"),
                    event.get("decision", ""),
                    event.get("user_id", ""),
                    event.get("rule", ""),
                    ref.key,
                )
            )
    return listed


def verify(
    archive: ArchiveStore,
    start: datetime,
    end: datetime,
    store: str | None = None,
    tenant: str | None = None,
    claim_idle_ms: int | None = None,
) -> list[VerifyReport]:
    """A session stored but not chained yet is in flight, not a problem, while younger than
    the time the archivers (their `claim_idle_ms`) take to chain it: see `in_flight_window`."""
    window = in_flight_window() if claim_idle_ms is None else in_flight_window(claim_idle_ms)
    return [archive.verify(t, s, start, end, in_flight=window) for t, s in stores_of(archive, store, tenant)]


def report_dict(report: VerifyReport) -> dict:
    return {**asdict(report), "ok": report.ok}


def format_verify(reports: list[VerifyReport]) -> str:
    lines = []
    for r in reports:
        status = "OK" if r.ok else f"{len(r.problems)} PROBLEM(S)"
        lines.append(
            f"{r.tenant}/{r.store}: {status} — {r.checked_sessions} sessions, {r.checked_entries} chain entries, "
            f"{r.expired} expired, {r.erased} erased, {len(r.in_flight)} in flight"
        )
        lines += [_problem_line(p) for p in r.problems + r.in_flight]
    return "\n".join(lines) if lines else "no archived stores in this range"


def _problem_line(problem: Problem) -> str:
    where = [
        f"{what} {value}"
        for what, value in (("seq", problem.seq), ("session", problem.session_id))
        if value is not None
    ]
    return f"  {problem.kind}: {' '.join(where) + ': ' if where else ''}{problem.detail}"


def format_list(sessions: list[ListedSession]) -> str:
    rows = [
        f"{s.decided_at}  {s.tenant}/{s.store}  {s.session_id}  {s.decision:<7}  {s.user_id or '-'}  {s.rule}"
        for s in sessions
    ]
    return "\n".join(rows) if rows else "no archived sessions in this range"


def sweep(archive: ArchiveStore, retention_days: int | None = None) -> SweepReport:
    """Delete what is older than the retention (the archiver also runs this every hour)."""
    return archive.sweep(retention_days)


def erase_user(archive: ArchiveStore, user_id: str, tenant: str | None = None) -> list[str]:
    """Frames and per-frame figures of every session that approved the user, in every tenant
    (or one): what `facepay users delete` erases from the archive (see README, Erasure)."""
    return [key for t in ([tenant] if tenant else archive.tenants()) for key in archive.erase_user(t, user_id)]
