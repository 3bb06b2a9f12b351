"""The audit archive on S3: one sealed object per decided payment session, a signed hash chain
per store, listing by store and time, verification, a retention sweep and erasure.

Layout (under the archive's prefix):

    sessions/<tenant>/<store>/<yyyy>/<mm>/<dd>/<hh>/<decided_ms>-<session>.fpa   the session (UTC hour)
    chains/<tenant>/<store>/entries/<seq:012d>.json    chain entry seq (signed), create-only
    chains/<tenant>/<store>/head.json                  signed chain head {seq, hash}, advanced by CAS
    chains/<tenant>/<store>/retention.json             signed retention checkpoint
    chains/<tenant>/<store>/archived/<session>.json    "this session is chained at seq n"
    users/<tenant>/<user digest>/<session>.json        sessions that approved a user (for erasure)

Tenant before store: a store belongs to one tenant, the tenant is the unit of keys, erasure and
bucket policy (an IAM policy can grant `sessions/acme/*`), and listing a store's hour is one
LIST of one prefix. Decision time in the key (zero-padded ms) sorts an hour's sessions in
decision order and lets a range be cut without opening objects.

Forks: two archiver replicas may append to one store's chain at once. The linearisation point
is the create-only write of entry `seq` (`If-None-Match: *`, which SeaweedFS, AWS S3 and MinIO
honour atomically): exactly one replica creates entry n+1; the other gets 412, re-reads the
tip and tries n+2. No Redis lock and no clock is involved.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import boto3
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from facepay.archive.chain import GENESIS, ChainEntry, ChainSignatureError, open_signed_document, signed_document
from facepay.archive.container import RecordError, SealedSession, open_session, seal_session
from facepay.archive.keys import ArchiveKeys
from facepay.archive.record import ArchivedSession
from facepay.archive.settings import ArchiveSettings

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SKEW_MS = 10 * 60 * 1000  # margin for the archivers' clocks
DEFAULT_MAX_LAG = timedelta(days=1)  # verify(range) walks entries chained up to this long after it
MAX_APPEND_ATTEMPTS = 200
S3_READ_TIMEOUT_S = 15  # one S3 request's read timeout (the client's Config below)
DEFAULT_CLAIM_IDLE_MS = 15_000  # Settings.claim_idle_ms's default (facepay/config.py)


def in_flight_window(claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS) -> timedelta:
    """How long a session may be stored and not yet chained while archiving is healthy: an
    archiver stores the object, then chains it a few requests later; one that stalls or dies in
    between has the session taken over and chained by another replica after `claim_idle_ms`
    (redelivery), with one S3 request (at most its read timeout) in progress. Younger than this,
    verify reports such a session as in flight; older, as unchained."""
    return timedelta(milliseconds=claim_idle_ms, seconds=S3_READ_TIMEOUT_S)


DEFAULT_IN_FLIGHT = in_flight_window()


class ArchiveError(RuntimeError):
    pass


class ArchiveUnavailable(ArchiveError):
    """The object store cannot be reached or answered 5xx: retry later; nothing was lost."""

    retryable = True


class ArchiveAccessDenied(ArchiveError):
    """The object store refused the credentials or the bucket: a set-up error, not retryable."""

    retryable = False


class ArchiveTampered(ArchiveError):
    """The store's chain head is missing or forged: appending would hide what happened.
    Not retryable: the archiver stops for this store (its lag grows) until someone looks."""

    retryable = False


class ArchiveContention(ArchiveError):
    """Too many replicas raced for the same store's chain; retry later."""

    retryable = True


def _check_id(value: str, what: str) -> str:
    if not SAFE_ID.match(value or ""):
        raise ValueError(f"{what} {value!r} cannot name an archive object (letters, digits, . _ -; at most 128)")
    return value


def _hour(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(minute=0, second=0, microsecond=0)


def _floor(parts: list[int]) -> datetime:
    """Start of the year / month / day / hour named by parts."""
    year, month, day, hour = (parts + [1, 1, 0][len(parts) - 1 :])[:4] if len(parts) < 4 else parts
    return datetime(year, month, day, hour, tzinfo=UTC)


def _ceiling(parts: list[int]) -> datetime:
    """Start of the next year / month / day / hour after the one named by parts."""
    start = _floor(parts)
    if len(parts) == 1:
        return start.replace(year=start.year + 1)
    if len(parts) == 2:
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + (timedelta(days=1) if len(parts) == 3 else timedelta(hours=1))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class ArchiveReceipt:
    key: str
    seq: int
    content_sha256: str
    already_archived: bool = False


@dataclass(frozen=True)
class SessionRef:
    key: str
    session_id: str
    decided_ms: int


@dataclass(frozen=True)
class Problem:
    # removed | altered | reordered | unchained | bad_signature | truncated | head_missing | quarantined;
    # in_flight (VerifyReport.in_flight, not a problem): stored moments ago, its chaining under way
    kind: str
    seq: int | None
    session_id: str | None
    detail: str


@dataclass
class VerifyReport:
    tenant: str
    store: str
    checked_sessions: int = 0
    checked_entries: int = 0
    expired: int = 0
    erased: int = 0
    problems: list[Problem] = field(default_factory=list)
    # Sessions stored but not yet chained, younger than the in-flight window: an archiver is
    # chaining them (a live archive). Not problems; verify again later to see them chained.
    in_flight: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}


@dataclass
class SweepReport:
    cutoff_ms: int
    deleted_sessions: int = 0
    deleted_entries: int = 0


def _unavailable(exc: Exception) -> ArchiveUnavailable:
    return ArchiveUnavailable(f"archive object store unavailable ({type(exc).__name__}: {exc}); retry later")


class ArchiveStore:
    def __init__(
        self,
        settings: ArchiveSettings,
        keys: ArchiveKeys,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock  # seconds; stamps chain entries and erasure notes
        self.keys = keys
        self._keys_read = self._keys_file_stamp()  # when the keys file was read (reread when it changes)
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        # Short timeouts and few retries: an outage must surface fast as ArchiveUnavailable so the
        # archiver leaves the session pending (lag) instead of blocking a batch for minutes.
        config = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=2,
            read_timeout=S3_READ_TIMEOUT_S,
            max_pool_connections=16,
        )
        # A session of its own: boto3's default session keeps the first credentials it found for
        # the life of the process, so a store made after a rotation would sign with the old ones.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=config,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    @classmethod
    def from_settings(cls, settings: ArchiveSettings) -> ArchiveStore:
        if settings.keys_file is None:
            raise ValueError("FACEPAY_ARCHIVE_KEYS_FILE is not set: the archive needs tenant KEKs and a signing key")
        return cls(settings, ArchiveKeys.from_file(settings.keys_file, settings.signing_key_hex))

    # --- tenant keys ------------------------------------------------------------------------
    def has_key_for(self, tenant: str) -> bool:
        """Whether sessions of `tenant` can be sealed. A tenant missing from the keys is a
        configuration error the operator fixes by adding its key to the file (a Secret updated
        in place): the file is read again first when it changed since it was read."""
        if tenant not in self.keys.tenants:
            self._reread_tenant_keys()
        return tenant in self.keys.tenants

    def _keys_file_stamp(self) -> tuple[int, int] | None:
        path = self.settings.keys_file
        try:
            info = path.stat() if path is not None else None
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ino) if info is not None else None

    def _reread_tenant_keys(self) -> None:
        """Adopt the tenants' keys of a changed keys file; the signing key in force stays (a
        new signing key is a rotation, made with a restart). A file that does not load (half
        written, malformed) is reported and the keys in force kept."""
        stamp = self._keys_file_stamp()
        if stamp is None or stamp == self._keys_read or self.settings.keys_file is None:
            return
        try:
            fresh = ArchiveKeys.from_file(self.settings.keys_file, self.settings.signing_key_hex)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:  # ArchiveKeyError is a ValueError
            log.warning(
                "archive keys file changed but does not load; the keys in force are kept",
                extra={"error": str(exc)[:300]},
            )
            return
        self._keys_read = stamp
        self.keys = ArchiveKeys(self.keys.signing_key, fresh.tenants)
        log.info("archive keys file reread", extra={"tenants": sorted(fresh.tenants)})

    # --- S3 primitives: every call maps transport failures to ArchiveUnavailable -----------
    def _s3(self, operation: str, **kwargs: object) -> dict:
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (BotoConnectionError, HTTPClientError) as exc:
            raise _unavailable(exc) from exc
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response["Error"]["Code"]
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
                raise _unavailable(exc) from exc
            if status == 403 or code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                raise ArchiveAccessDenied(
                    f"the archive refused {operation} on bucket {self.bucket!r} ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy"
                ) from exc
            if code == "NoSuchBucket":
                raise ArchiveAccessDenied(
                    f"archive bucket {self.bucket!r} does not exist (FACEPAY_ARCHIVE_URL)"
                ) from exc
            raise

    def ensure_bucket(self) -> None:
        try:
            self._s3("head_bucket")
        except ArchiveAccessDenied as exc:
            if "does not exist" not in str(exc):
                raise
            self._create_bucket()
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("404", "NotFound"):
                raise
            self._create_bucket()

    def _create_bucket(self) -> None:
        """Create it; another archiver replica (or an auditor) creating it meanwhile is success."""
        try:
            self._s3("create_bucket")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _put_if_absent(self, key: str, body: bytes) -> bool:
        try:
            self._s3("put_object", Key=key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._s3("get_object", Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            return response["Body"].read(), response["ETag"]
        except (BotoConnectionError, HTTPClientError) as exc:
            raise _unavailable(exc) from exc

    def _list(self, prefix: str, start_after: str | None = None) -> Iterator[str]:
        kwargs: dict = {"Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        while True:
            page = self._s3("list_objects_v2", **kwargs)
            yield from (item["Key"] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
            kwargs.pop("StartAfter", None)

    def _children(self, prefix: str) -> list[str]:
        """The next path level under prefix (S3 'folders')."""
        names, kwargs = [], {"Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._s3("list_objects_v2", **kwargs)
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return names
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _delete(self, key: str) -> None:
        self._s3("delete_object", Key=key)

    # --- keys -------------------------------------------------------------------------------
    def session_key(self, tenant: str, store: str, decided_ms: int, session_id: str) -> str:
        return f"{self._hour_prefix(tenant, store, _hour(decided_ms))}{decided_ms:013d}-{session_id}.fpa"

    def _hour_prefix(self, tenant: str, store: str, hour: datetime) -> str:
        return f"{self.prefix}sessions/{tenant}/{store}/{hour:%Y/%m/%d/%H}/"

    def _chain(self, tenant: str, store: str) -> str:
        return f"{self.prefix}chains/{tenant}/{store}/"

    def _entry_key(self, tenant: str, store: str, seq: int) -> str:
        return f"{self._chain(tenant, store)}entries/{seq:012d}.json"

    def _marker_key(self, tenant: str, store: str, session_id: str) -> str:
        return f"{self._chain(tenant, store)}archived/{session_id}.json"

    def _user_digest(self, tenant: str, user_id: str) -> str:
        # Keyed, so the bucket's key names do not reveal who paid where.
        return hmac.new(self.keys.signing_key, f"user/{tenant}/{user_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def _user_index_key(self, tenant: str, user_digest: str, session_id: str) -> str:
        return f"{self.prefix}users/{tenant}/{user_digest}/{session_id}.json"

    # --- writing ------------------------------------------------------------------------------
    def archive(self, session: ArchivedSession) -> ArchiveReceipt:
        """Store one decided session and chain it; idempotent per session id (redelivery-safe).
        ArchiveTampered when the store's chain refuses appends: the session is then stored but
        not chained (the archiver `quarantine`s it)."""
        tenant, store = _check_id(session.tenant, "tenant"), _check_id(session.store, "store")
        _check_id(session.session_id, "session id")
        key = self.session_key(tenant, store, session.decided_ms, session.session_id)
        sealed = self._seal(session)
        stored_before = not self._put_if_absent(key, sealed.to_bytes())
        if stored_before:  # an earlier attempt stored it: chain what is stored
            sealed = self._read_sealed(key)
        user = self._user_digest(tenant, session.user_id) if session.user_id else None
        return self._link(tenant, store, session.session_id, key, session.decided_ms, user, sealed, stored_before)

    def _seal(self, session: ArchivedSession) -> SealedSession:
        if not self.settings.keep_embeddings:
            session = replace(session, frames=[replace(f, embedding=None) for f in session.frames])
        return seal_session(session, self.keys)

    def _link(
        self,
        tenant: str,
        store: str,
        session_id: str,
        key: str,
        decided_ms: int,
        user: str | None,
        sealed: SealedSession,
        stored_before: bool,
    ) -> ArchiveReceipt:
        """Chain a stored session once: unless an earlier attempt got that far."""
        if stored_before:
            marker = self._get(self._marker_key(tenant, store, session_id))
            if marker is not None:
                return ArchiveReceipt(key, json.loads(marker[0])["seq"], sealed.content_sha256(), already_archived=True)
            chained = self._find_entry(tenant, store, session_id, self._stored_ms(key))
            if chained is not None:  # the entry was written, its acknowledgement lost
                self._advance_head(tenant, store, chained)
                self._s3(
                    "put_object",
                    Key=self._marker_key(tenant, store, session_id),
                    Body=json.dumps({"seq": chained.seq}).encode(),
                )
                return ArchiveReceipt(key, chained.seq, chained.content_sha256, already_archived=True)
        if user:
            self._s3(
                "put_object", Key=self._user_index_key(tenant, user, session_id), Body=json.dumps({"key": key}).encode()
            )
        entry = self._append(tenant, store, session_id, key, decided_ms, sealed.content_sha256(), user)
        # The head before the marker: a head found removed or forged here (ArchiveTampered: the
        # session is quarantined) leaves the session unmarked, so draining the quarantine
        # finds its entry and tries the head again, instead of taking the marker for done.
        self._advance_head(tenant, store, entry)
        self._s3(
            "put_object", Key=self._marker_key(tenant, store, session_id), Body=json.dumps({"seq": entry.seq}).encode()
        )
        return ArchiveReceipt(key, entry.seq, entry.content_sha256)

    # --- quarantine: sessions a store's chain refuses -------------------------------------------
    def _quarantine_key(self, tenant: str, store: str, decided_ms: int, session_id: str) -> str:
        return f"{self.prefix}quarantine/{tenant}/{store}/{decided_ms:013d}-{session_id}.json"

    def quarantine(self, session: ArchivedSession, reason: str) -> str:
        """Keep a session that its store's chain refused (ArchiveTampered) sealed in its place,
        outside the chain, with a note signed under the archive key naming its content hash:
        its frames can leave Redis, the other stores go on, verify reports it as quarantined,
        and `drain_quarantine` chains it once the chain takes appends again."""
        tenant, store = _check_id(session.tenant, "tenant"), _check_id(session.store, "store")
        key = self.session_key(tenant, store, session.decided_ms, _check_id(session.session_id, "session id"))
        self._put_if_absent(key, self._seal(session).to_bytes())  # archive() normally stored it already
        sealed = self._read_sealed(key)
        user = self._user_digest(tenant, session.user_id) if session.user_id else None
        if user:  # erasure finds it like any other session
            self._s3(
                "put_object",
                Key=self._user_index_key(tenant, user, session.session_id),
                Body=json.dumps({"key": key}).encode(),
            )
        note = {
            "key": key,
            "session_id": session.session_id,
            "decided_ms": session.decided_ms,
            "user": user,
            "content_sha256": sealed.content_sha256(),
            "reason": reason,
            "quarantined_ms": int(self.clock() * 1000),
        }
        marker = self._quarantine_key(tenant, store, session.decided_ms, session.session_id)
        self._s3("put_object", Key=marker, Body=signed_document(note, self.keys))
        return marker

    def quarantined(self, tenant: str, store: str) -> list[dict]:
        """The store's sessions held outside its chain (their signed notes), in decision order;
        a note that does not verify comes back as {"key", "problem"}."""
        notes = []
        for marker in self._list(f"{self.prefix}quarantine/{tenant}/{store}/"):
            found = self._get(marker)
            if found is None:
                continue
            try:
                notes.append({**open_signed_document(found[0], self.keys), "marker": marker})
            except (ChainSignatureError, ValueError, KeyError, TypeError) as exc:
                notes.append({"marker": marker, "problem": f"quarantine note {marker}: {exc}"})
        return notes

    def drain_quarantine(self) -> list[str]:
        """Chain every quarantined session whose store's chain takes appends again, in decision
        order per store; returns their session ids. A store still refusing keeps its sessions."""
        chained, refusing = [], set()
        base = f"{self.prefix}quarantine/"
        stores = {tuple(k[len(base) :].split("/")[:2]) for k in self._list(base)}
        for tenant, store in sorted(stores):
            for note in self.quarantined(tenant, store):
                if (tenant, store) in refusing or "problem" in note:
                    continue
                try:
                    sealed = self._read_sealed(note["key"])
                except (KeyError, RecordError) as exc:  # removed or altered meanwhile: verify says so
                    log.error(
                        "quarantined session unreadable; left for verify", extra={"key": note["key"], "error": str(exc)}
                    )
                    continue
                if sealed.content_sha256() != note["content_sha256"]:
                    log.error("quarantined session altered; not chained", extra={"key": note["key"]})
                    continue
                try:
                    self._link(
                        tenant, store, note["session_id"], note["key"], note["decided_ms"], note["user"], sealed, True
                    )
                except ArchiveTampered:
                    refusing.add((tenant, store))
                    continue
                self._delete(note["marker"])
                chained.append(note["session_id"])
        return chained

    def _append(
        self, tenant: str, store: str, session_id: str, key: str, decided_ms: int, content: str, user: str | None
    ) -> ChainEntry:
        for _ in range(MAX_APPEND_ATTEMPTS):
            tip_seq, tip_hash, tip_ms = self._tip(tenant, store)
            chained_ms = max(int(self.clock() * 1000), tip_ms)
            entry = ChainEntry(tip_seq + 1, tip_hash, session_id, key, decided_ms, content, user, chained_ms)
            if self._put_if_absent(self._entry_key(tenant, store, entry.seq), entry.to_bytes(self.keys)):
                return entry
        raise ArchiveContention(
            f"could not append to the chain of {tenant}/{store} after {MAX_APPEND_ATTEMPTS} attempts"
        )

    def _find_entry(self, tenant: str, store: str, session_id: str, stored_ms: int) -> ChainEntry | None:
        """The session's entry, looked for among entries chained since its object was stored
        (rare path: an archiver died, or lost a reply, between chaining a session and marking it)."""
        seqs = self._entry_seqs(tenant, store)
        for seq in seqs[self._first_index(tenant, store, seqs, stored_ms - SKEW_MS) :]:
            entry = self._entry_or_tampered(self._entry_key(tenant, store, seq))
            if entry.session_id == session_id:
                return entry
        return None

    def _stored_ms(self, key: str) -> int:
        return _ms(self._s3("head_object", Key=key)["LastModified"])

    def _stored_age(self, key: str) -> timedelta | None:
        """How long ago the object was stored, both ends on the object store's clock (its
        Last-Modified and the reply's Date), so the auditor's clock does not count; None when
        it is gone or the server gives no date."""
        try:
            response = self._s3("head_object", Key=key)
        except ClientError:
            return None
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return None
        try:
            now = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return None
        return now - response["LastModified"]

    def _entry_seqs(self, tenant: str, store: str) -> list[int]:
        return [int(k.rsplit("/", 1)[-1][:-5]) for k in self._list(f"{self._chain(tenant, store)}entries/")]

    def _head(self, tenant: str, store: str) -> tuple[dict | None, str | None]:
        """(head, etag); (None, etag) when it exists but its signature does not match."""
        found = self._get(f"{self._chain(tenant, store)}head.json")
        if found is None:
            return None, None
        try:
            return open_signed_document(found[0], self.keys), found[1]
        except (ChainSignatureError, ValueError, KeyError):
            log.warning("archive chain head of %s/%s has a bad signature", tenant, store)
            return None, found[1]

    def _tip(self, tenant: str, store: str) -> tuple[int, str, int]:
        """Seq, hash and chained_ms of the last entry: from the head (a hint that may lag),
        then whatever follows it. A new chain gets its head (seq 0) before its first entry, so
        a missing head next to entries means someone removed it.

        Missing when read, entries when listed next, is not yet that: another replica may have
        started the chain in between (head, then entry 1). So the head is read again after the
        listing: entries listed had their head before, so missing now means removed."""
        head, etag = self._head(tenant, store)
        entries = f"{self._chain(tenant, store)}entries/"
        if head is None and etag is None and next(self._list(entries), None) is not None:
            head, etag = self._head(tenant, store)
            if head is None and etag is None:
                raise ArchiveTampered(
                    f"the chain of {tenant}/{store} has entries but no head; not appending (run verify)"
                )
        if head is None and etag is not None:
            raise ArchiveTampered(f"the chain head of {tenant}/{store} has a bad signature; not appending (run verify)")
        if head is None:
            genesis = signed_document({"seq": 0, "hash": GENESIS, "chained_ms": 0}, self.keys)
            self._put_if_absent(
                f"{self._chain(tenant, store)}head.json", genesis
            )  # another replica may win: same content
            head = {"seq": 0, "hash": GENESIS, "chained_ms": 0}
        seq, hash_, chained_ms = head["seq"], head["hash"], head["chained_ms"]
        after = self._entry_key(tenant, store, seq) if seq else None
        last = None
        for last in self._list(entries, start_after=after):  # noqa: B007 - the last one listed
            pass
        if last is None:
            return seq, hash_, chained_ms
        entry = self._entry_or_tampered(last)
        return entry.seq, entry.hash, entry.chained_ms

    def _entry(self, key: str) -> ChainEntry:
        found = self._get(key)
        if found is None:
            raise ArchiveError(f"chain entry {key} vanished while being read")
        return ChainEntry.from_bytes(found[0], self.keys)

    def _entry_or_tampered(self, key: str) -> ChainEntry:
        """A chain entry the archiver must read to append: one that does not parse or verify
        means the chain was tampered with, and appending after it would bury that."""
        try:
            return self._entry(key)
        except (ChainSignatureError, ValueError, KeyError, TypeError) as exc:
            raise ArchiveTampered(f"chain entry {key} is unreadable ({exc}); not appending (run verify)") from exc

    def _advance_head(self, tenant: str, store: str, entry: ChainEntry) -> None:
        """Compare-and-set, so the head never moves back when replicas finish out of order.

        The head exists here: the chain's genesis head was made (by `_tip`, this replica's or
        another's) before entry 1, and the archive never removes it. So a head missing or
        badly signed now was removed or forged since this replica read it: ArchiveTampered, as
        `_tip` says. Writing a head back would erase the evidence of the removal for good."""
        key = f"{self._chain(tenant, store)}head.json"
        body = signed_document({"seq": entry.seq, "hash": entry.hash, "chained_ms": entry.chained_ms}, self.keys)
        for _ in range(MAX_APPEND_ATTEMPTS):
            head, etag = self._head(tenant, store)
            if etag is None:
                raise ArchiveTampered(
                    f"the chain head of {tenant}/{store} vanished after entry {entry.seq} was chained; "
                    "not putting it back (run verify)"
                )
            if head is None:
                raise ArchiveTampered(
                    f"the chain head of {tenant}/{store} has a bad signature; not advancing it (run verify)"
                )
            if head["seq"] >= entry.seq:
                return
            try:
                self._s3("put_object", Key=key, Body=body, IfMatch=etag)
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise
        raise ArchiveContention(f"could not advance the chain head of {tenant}/{store}")

    # --- reading --------------------------------------------------------------------------------
    def tenants(self) -> list[str]:
        return self._children(f"{self.prefix}sessions/")

    def stores(self, tenant: str) -> list[str]:
        return self._children(f"{self.prefix}sessions/{tenant}/")

    def list_sessions(self, tenant: str, store: str, start: datetime, end: datetime) -> list[SessionRef]:
        """Sessions decided in [start, end), in decision order: one LIST per hour of the range."""
        start_ms, end_ms = _ms(start), _ms(end)
        refs = []
        for hour in self._hours(tenant, store, _hour(start_ms), end):
            for key in self._list(self._hour_prefix(tenant, store, hour)):
                ref = self._ref(key)
                if ref and start_ms <= ref.decided_ms < end_ms:
                    refs.append(ref)
        return refs

    def _hours(self, tenant: str, store: str, first: datetime, end: datetime) -> Iterator[datetime]:
        """The hours in [first, end) that hold sessions, walking year/month/day/hour folders
        (a LIST per existing folder in range, not one per hour: a 90-day range with a few busy
        days costs a few dozen requests, not 2,160)."""
        base = f"{self.prefix}sessions/{tenant}/{store}/"
        widths = [(4, "year"), (2, "month"), (2, "day"), (2, "hour")]

        def walk(prefix: str, parts: list[int]) -> Iterator[datetime]:
            level = len(parts)
            for name in sorted(self._children(prefix)):
                if not name.isdigit() or len(name) != widths[level][0]:
                    continue
                values = parts + [int(name)]
                low = _floor(values)
                if _ceiling(values) <= first or low >= end:
                    continue
                if level == 3:
                    yield low
                else:
                    yield from walk(f"{prefix}{name}/", values)

        yield from walk(base, [])

    @staticmethod
    def _ref(key: str) -> SessionRef | None:
        name = key.rsplit("/", 1)[-1]
        match = re.match(r"^(\d{13})-(.+)\.fpa$", name)
        return SessionRef(key, match.group(2), int(match.group(1))) if match else None

    def _read_sealed(self, key: str) -> SealedSession:
        found = self._get(key)
        if found is None:
            raise KeyError(f"no archived session at {key}")
        return SealedSession.from_bytes(found[0])

    def read_header(self, key: str) -> dict:
        """The session's clear header (ids, times, signed decision, models, threshold, policy):
        what listing and auditing a decision need, without any key."""
        return self._read_sealed(key).header

    def read(self, key: str) -> ArchivedSession:
        """The session, frames decrypted with its tenant's KEK (an erased session has none)."""
        return open_session(self._read_sealed(key), self.keys)

    # --- verification -------------------------------------------------------------------------------
    def verify(
        self,
        tenant: str,
        store: str,
        start: datetime,
        end: datetime,
        max_lag: timedelta = DEFAULT_MAX_LAG,
        in_flight: timedelta = DEFAULT_IN_FLIGHT,
    ) -> VerifyReport:
        """Check the chain around [start, end) and every session decided in it.

        Walks the entries chained from `start` to `end + max_lag` (a session is chained after
        its decision, normally seconds later), checking signatures, positions and links, and
        the object of every entry decided in the range; a session of the range chained later
        than that is found through its marker and checked with its neighbours.

        removed: an entry or a session object is missing; altered: bytes, hashes or signatures
        do not match; reordered: an entry or a session sits at a position not its own;
        unchained: an object in the range that no entry names; truncated: the chain ends
        before its signed head.

        The archive may be live (archivers appending meanwhile). A session stored less than
        `in_flight` ago (object store's clock) and not chained yet is reported in
        `report.in_flight`, not as unchained: its archiver is chaining it (`in_flight_window`).
        """
        report = VerifyReport(tenant, store)
        start_ms, end_ms = _ms(start), _ms(end)
        retention = self._retention(tenant, store, report)
        seqs = self._kept_seqs(tenant, store, retention)
        head, head_etag = self._head(tenant, store)
        if head and head["seq"] > (seqs[-1] if seqs else 0):
            # A replica may have appended and moved the head between the listing and the head
            # read. The head moves only after its entry exists, so a listing made now holds
            # entry head.seq, unless it was removed: one more listing tells a live chain from
            # a cut one.
            seqs = self._kept_seqs(tenant, store, retention)
        self._check_head(head, head_etag, seqs, report)
        entries = self._walk(
            tenant, store, seqs, start_ms - SKEW_MS, end_ms + int(max_lag.total_seconds() * 1000), retention, report
        )
        by_content = {e.content_sha256: e for e in entries}
        for entry in entries:
            if start_ms <= entry.decided_ms < end_ms:
                self._check_session(entry, by_content, retention, report)
        walked = {e.key for e in entries}
        quarantined = self._check_quarantined(tenant, store, report)
        for ref in self.list_sessions(tenant, store, start, end):
            if ref.key not in walked and ref.key not in quarantined:
                self._check_late_session(tenant, store, ref, by_content, retention, in_flight, report)
        return report

    def _kept_seqs(self, tenant: str, store: str, retention: dict | None) -> list[int]:
        seqs = self._entry_seqs(tenant, store)
        return [s for s in seqs if s >= retention["first_seq"]] if retention else seqs

    def _check_quarantined(self, tenant: str, store: str, report: VerifyReport) -> set[str]:
        """Every session held outside the store's chain, whatever the range (an operator must
        act on them); each checked against its signed note. Returns their object keys."""
        keys = set()
        for note in self.quarantined(tenant, store):
            if "problem" in note:
                report.problems.append(Problem("altered", None, None, note["problem"]))
                continue
            keys.add(note["key"])
            since = datetime.fromtimestamp(note["quarantined_ms"] / 1000, UTC).isoformat(timespec="seconds")
            report.problems.append(
                Problem(
                    "quarantined",
                    None,
                    note["session_id"],
                    f"{note['key']} held outside the chain since {since}: {note['reason']}",
                )
            )
            found = self._get(note["key"])
            if found is None:
                report.problems.append(
                    Problem("removed", None, note["session_id"], f"quarantined {note['key']} is missing")
                )
                continue
            try:
                sealed = SealedSession.from_bytes(found[0])
            except RecordError as exc:
                report.problems.append(Problem("altered", None, note["session_id"], str(exc)))
                continue
            if sealed.content_sha256() != note["content_sha256"]:
                report.problems.append(
                    Problem(
                        "altered",
                        None,
                        note["session_id"],
                        f"{note['key']}: content hash does not match its quarantine note",
                    )
                )
            for problem in sealed.integrity_problems(self.keys):
                report.problems.append(Problem("altered", None, note["session_id"], problem))
        return keys

    @staticmethod
    def _check_head(head: dict | None, head_etag: str | None, seqs: list[int], report: VerifyReport) -> None:
        if head is None and head_etag is not None:
            report.problems.append(Problem("bad_signature", None, None, "chain head signature does not match"))
        elif head is None and seqs:
            report.problems.append(Problem("head_missing", None, None, "the chain has entries but no signed head"))
        elif head and head["seq"] > (seqs[-1] if seqs else 0):
            report.problems.append(
                Problem(
                    "truncated",
                    head["seq"],
                    None,
                    f"chain ends at {seqs[-1] if seqs else 0}, its signed head is at {head['seq']}",
                )
            )

    def _retention(self, tenant: str, store: str, report: VerifyReport | None = None) -> dict | None:
        found = self._get(f"{self._chain(tenant, store)}retention.json")
        if found is None:
            return None
        try:
            return open_signed_document(found[0], self.keys)
        except (ChainSignatureError, ValueError, KeyError):
            if report is not None:
                report.problems.append(
                    Problem("bad_signature", None, None, "retention checkpoint signature does not match")
                )
            return None

    def _first_index(self, tenant: str, store: str, seqs: list[int], from_ms: int) -> int:
        """Binary search for the last entry chained before from_ms (chained_ms never decreases)."""
        low, high = 0, len(seqs)
        while low < high:
            mid = (low + high) // 2
            try:
                chained = self._entry(self._entry_key(tenant, store, seqs[mid])).chained_ms
            except (ChainSignatureError, ValueError, KeyError, TypeError, ArchiveError):
                chained = from_ms  # unreadable: let the walk report it
            if chained < from_ms:
                low = mid + 1
            else:
                high = mid
        return max(0, low - 1)

    def _walk(
        self,
        tenant: str,
        store: str,
        seqs: list[int],
        from_ms: int,
        to_ms: int,
        retention: dict | None,
        report: VerifyReport,
    ) -> list[ChainEntry]:
        """The entries chained in [from_ms, to_ms] (and the one before), position and link checked."""
        if not seqs:
            return []
        first = self._first_index(tenant, store, seqs, from_ms)
        chain_start = retention["first_seq"] if retention else 1
        if first == 0 and seqs[0] != chain_start:
            report.problems.append(
                Problem("removed", chain_start, None, f"chain entries {chain_start}..{seqs[0] - 1} are missing")
            )
        if retention and seqs[first] == retention["first_seq"]:
            previous_hash: str | None = retention["prev"]
        elif seqs[first] == 1:
            previous_hash = GENESIS
        else:
            previous_hash = None  # starting mid-chain: the first entry's prev is taken on trust
        expected_seq, entries = seqs[first], []
        for seq in seqs[first:]:
            if seq != expected_seq:
                report.problems.append(
                    Problem("removed", expected_seq, None, f"chain entries {expected_seq}..{seq - 1} are missing")
                )
                previous_hash = None
            expected_seq = seq + 1
            try:
                entry = self._entry(self._entry_key(tenant, store, seq))
            except (ChainSignatureError, ValueError, KeyError, TypeError) as exc:
                report.problems.append(Problem("altered", seq, None, f"chain entry {seq}: {exc}"))
                previous_hash = None
                continue
            if entry.chained_ms > to_ms:
                break
            report.checked_entries += 1
            if entry.seq != seq:
                report.problems.append(
                    Problem("reordered", seq, entry.session_id, f"entry stored at {seq} says it is {entry.seq}")
                )
            elif previous_hash is not None and entry.prev != previous_hash:
                report.problems.append(
                    Problem("reordered", seq, entry.session_id, f"entry {seq} does not follow entry {seq - 1}")
                )
            previous_hash = entry.hash
            entries.append(entry)
        return entries

    def _check_late_session(
        self,
        tenant: str,
        store: str,
        ref: SessionRef,
        by_content: dict[str, ChainEntry],
        retention: dict | None,
        in_flight: timedelta,
        report: VerifyReport,
    ) -> None:
        """A session of the range chained after the walked window: found by its marker, its
        entry checked against both neighbours. One without a marker is unchained, unless it
        was stored less than `in_flight` ago (its archiver is chaining it)."""
        marker = self._get(self._marker_key(tenant, store, ref.session_id))
        if marker is None:
            age = self._stored_age(ref.key)
            if age is not None and age < in_flight:
                report.in_flight.append(
                    Problem(
                        "in_flight",
                        None,
                        ref.session_id,
                        f"{ref.key} stored {age.total_seconds():.0f} s ago, not chained yet "
                        f"(unchained if still so after {in_flight.total_seconds():.0f} s)",
                    )
                )
                return
            report.problems.append(Problem("unchained", None, ref.session_id, f"{ref.key} is named by no chain entry"))
            return
        seq = json.loads(marker[0])["seq"]
        try:
            entry = self._entry(self._entry_key(tenant, store, seq))
            before = self._get(self._entry_key(tenant, store, seq - 1)) if seq > 1 else None
            after = self._get(self._entry_key(tenant, store, seq + 1))
            previous_hash = ChainEntry.from_bytes(before[0], self.keys).hash if before else GENESIS
            next_entry = ChainEntry.from_bytes(after[0], self.keys) if after else None
        except (ChainSignatureError, ValueError, KeyError, TypeError, ArchiveError) as exc:
            report.problems.append(Problem("altered", seq, ref.session_id, f"chain around entry {seq}: {exc}"))
            return
        report.checked_entries += 1
        first_kept = retention["first_seq"] if retention else 1
        linked_before = (
            entry.prev == previous_hash
            if (before or seq == 1)
            else seq == first_kept and entry.prev == (retention or {}).get("prev")
        )
        if (
            entry.seq != seq
            or entry.key != ref.key
            or not linked_before
            or (next_entry and next_entry.prev != entry.hash)
        ):
            report.problems.append(
                Problem("reordered", seq, ref.session_id, f"entry {seq} is not linked where its marker says")
            )
        self._check_session(entry, by_content, retention, report)

    def _check_session(
        self, entry: ChainEntry, by_content: dict[str, ChainEntry], retention: dict | None, report: VerifyReport
    ) -> None:
        found = self._get(entry.key)
        if found is None:
            if retention and entry.decided_ms < retention["cutoff_ms"]:
                report.expired += 1
            else:
                report.problems.append(Problem("removed", entry.seq, entry.session_id, f"{entry.key} is missing"))
            return
        report.checked_sessions += 1
        try:
            sealed = SealedSession.from_bytes(found[0])
        except RecordError as exc:
            report.problems.append(Problem("altered", entry.seq, entry.session_id, str(exc)))
            return
        content = sealed.content_sha256()
        if content != entry.content_sha256:
            elsewhere = by_content.get(content)
            if elsewhere is not None:
                report.problems.append(
                    Problem(
                        "reordered",
                        entry.seq,
                        entry.session_id,
                        f"{entry.key} holds session {elsewhere.session_id} (entry {elsewhere.seq})",
                    )
                )
            else:
                report.problems.append(
                    Problem(
                        "altered",
                        entry.seq,
                        entry.session_id,
                        f"{entry.key}: content hash does not match its chain entry",
                    )
                )
            return
        for problem in sealed.integrity_problems(self.keys):
            report.problems.append(Problem("altered", entry.seq, entry.session_id, problem))
        if sealed.erased:
            report.erased += 1

    # --- retention -------------------------------------------------------------------------------
    def sweep(self, retention_days: int | None = None, now: datetime | None = None) -> SweepReport:
        """Delete every session decided before now - retention_days, in every tenant and store."""
        days = self.settings.retention_days if retention_days is None else retention_days
        cutoff_ms = _ms((now or datetime.now(UTC)) - timedelta(days=days))
        report = SweepReport(cutoff_ms)
        stores = {
            (t, s) for t in self._children(f"{self.prefix}chains/") for s in self._children(f"{self.prefix}chains/{t}/")
        }
        stores |= {(t, s) for t in self.tenants() for s in self.stores(t)}
        for tenant, store in sorted(stores):
            self._sweep_store(tenant, store, cutoff_ms, report)
        return report

    def _sweep_store(self, tenant: str, store: str, cutoff_ms: int, report: SweepReport) -> None:
        expired = self._expired_entries(tenant, store, cutoff_ms)
        epoch = datetime.fromtimestamp(0, UTC)
        cutoff = datetime.fromtimestamp(cutoff_ms / 1000, UTC)
        doomed = [ref.key for ref in self.list_sessions(tenant, store, epoch, cutoff)]
        if not expired and not doomed:
            return
        # The checkpoint first: a sweep that dies half-way leaves sessions verify calls expired.
        previous = self._retention(tenant, store) or {"first_seq": 1, "prev": GENESIS}
        checkpoint = {
            "first_seq": expired[-1].seq + 1 if expired else previous["first_seq"],
            "prev": expired[-1].hash if expired else previous["prev"],
            "cutoff_ms": cutoff_ms,
        }
        self._s3(
            "put_object", Key=f"{self._chain(tenant, store)}retention.json", Body=signed_document(checkpoint, self.keys)
        )
        for key in doomed:  # chained or not: an archiver that died between writes leaves orphans
            self._delete(key)
            ref = self._ref(key)
            if ref:  # a session that expired while quarantined takes its note with it
                self._delete(self._quarantine_key(tenant, store, ref.decided_ms, ref.session_id))
            report.deleted_sessions += 1
        for entry in expired:
            self._delete(self._marker_key(tenant, store, entry.session_id))
            if entry.user:
                self._delete(self._user_index_key(tenant, entry.user, entry.session_id))
            self._delete(self._entry_key(tenant, store, entry.seq))
            report.deleted_entries += 1

    def _expired_entries(self, tenant: str, store: str, cutoff_ms: int) -> list[ChainEntry]:
        """The chain's expired prefix. The tip entry stays: the next session chains on it. An
        entry chained late (decided before its predecessors) waits for them."""
        expired = []
        for seq in self._entry_seqs(tenant, store)[:-1]:
            entry = self._entry(self._entry_key(tenant, store, seq))
            if entry.decided_ms >= cutoff_ms:
                break
            expired.append(entry)
        return expired

    # --- erasure -----------------------------------------------------------------------------------
    def erase_user(self, tenant: str, user_id: str, reason: str = "user deleted") -> list[str]:
        """Remove the frames, per-frame outputs and data key of every session that approved
        the user; the header (signed decision event, models, threshold) and the chain stay."""
        digest = self._user_digest(tenant, user_id)
        erased = []
        for index_key in list(self._list(f"{self.prefix}users/{tenant}/{digest}/")):
            found = self._get(index_key)
            if found is None:
                continue
            key = json.loads(found[0])["key"]
            if self._erase_session(key, reason):
                erased.append(key)
            self._delete(index_key)
        return erased

    def _erase_session(self, key: str, reason: str) -> bool:
        for _ in range(10):
            found = self._get(key)
            if found is None:
                return False
            sealed = SealedSession.from_bytes(found[0])
            if sealed.erased:
                return True
            sealed.erase(self.keys, reason, int(self.clock() * 1000))
            try:
                self._s3("put_object", Key=key, Body=sealed.to_bytes(), IfMatch=found[1])
                return True
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                    raise
        raise ArchiveContention(f"{key} kept changing while being erased")
