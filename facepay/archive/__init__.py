"""The audit archive: every decided payment session, sealed and hash-chained on S3.

See the README section "Audit archive" for the layout, keys, retention and
erasure choices.
"""

from facepay.archive.embedded import EmbeddedS3, weed_binary
from facepay.archive.keys import ArchiveKeyError, ArchiveKeys
from facepay.archive.record import RECORD_SCHEMA_VERSION, ArchivedFrame, ArchivedSession, Candidate, SignedDecision
from facepay.archive.settings import ArchiveConfigError, ArchiveSettings
from facepay.archive.store import (
    ArchiveAccessDenied,
    ArchiveContention,
    ArchiveError,
    ArchiveReceipt,
    ArchiveStore,
    ArchiveTampered,
    ArchiveUnavailable,
    Problem,
    SessionRef,
    SweepReport,
    VerifyReport,
    in_flight_window,
)

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "ArchiveAccessDenied",
    "ArchiveConfigError",
    "ArchiveContention",
    "ArchiveError",
    "ArchiveKeyError",
    "ArchiveKeys",
    "ArchiveReceipt",
    "ArchiveSettings",
    "ArchiveStore",
    "ArchiveTampered",
    "ArchiveUnavailable",
    "ArchivedFrame",
    "ArchivedSession",
    "Candidate",
    "EmbeddedS3",
    "Problem",
    "SessionRef",
    "SignedDecision",
    "SweepReport",
    "VerifyReport",
    "in_flight_window",
    "weed_binary",
]
