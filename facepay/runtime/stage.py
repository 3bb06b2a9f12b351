"""What a stage is: a small class that turns a batch of messages into messages.

Stages know nothing of Redis. The runtime (`facepay.runtime.worker`) reads their input stream
as a consumer group, calls `process`, and writes what it returns while acknowledging the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from facepay.keys import TrustedKeys
from facepay.messages import Message
from facepay.sessions import session_key


@dataclass(frozen=True)
class Emit:
    """One entry to write. With `once_key` it is written only if that key was never set."""

    stream: str  # stream name inside the namespace, e.g. "faces"
    payload: bytes | dict[bytes, bytes]
    once_key: str | None = None
    # The session it belongs to, "store/session" (facepay.runtime.partitions): places an entry
    # of a partitioned stream (and its once-key) in that session's partition.
    partition_key: str | None = None
    # Entries of other streams written with this one, atomically and under its once-key (both
    # or neither), e.g. the recognizer's decision record for the archiver beside the decision
    # event that backends read. Same session (partition_key) as this entry; no once-key of
    # their own.
    beside: tuple[Emit, ...] = ()


def session_of(message: Message) -> str:
    """A message's session as partitions know it (`facepay.sessions.session_key`)."""
    return session_key(message.ref.store_id, message.ref.session_id)


class StageBacklog(RuntimeError):
    """A dependency outside Redis cannot take the batch for now (the archive's object store is
    down): the runtime holds the batch pending and retries it with a backoff, like a Redis
    refusal. Never counted as a failure, never dead-lettered; the group's lag shows it."""


class EntryDeferred(RuntimeError):
    """This message cannot be processed for now, for a reason of its own, while the rest of the
    input can (the archive has no key for its tenant yet): the runtime leaves its entry pending —
    not acknowledged, not counted as a failure, never dead-lettered — and goes on with the others.
    It is tried again once idle for claim_idle_ms (reclaimed like a dead consumer's entry).
    Raised for a batch of several, the batch is retried one entry at a time, so only the
    deferred ones stay behind: `process` must be safe to run again on the others (idempotent).
    The stage says why, loudly (log, metric): the group's pending count shows how many wait.

    `reason` (e.g. "no_archive_key") and `scope` (what it applies to, e.g. the tenant) label the
    runtime's facepay_deferred_entries gauge and /readyz's body: a few values each, never a
    session or an entry id (one time series per value)."""

    def __init__(self, message: str, reason: str = "deferred", scope: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.scope = scope


class StageContractError(RuntimeError):
    """A stage broke its contract with the runtime (a programming error, not bad input)."""


class Stage:
    name: ClassVar[str]  # the consumer group, and the label on metrics and logs
    input: ClassVar[str]  # stream it reads
    # Message type → the components whose signature this stage accepts for it on its input;
    # anything else is dead-lettered as unauthenticated before it is decoded further.
    accepts_from: ClassVar[dict[str, frozenset[str]]] = {}
    # Runs models on FACEPAY_DEVICE: the runtime checks that device before anything else.
    uses_device: ClassVar[bool] = False

    def start(self) -> None:
        """Load models; called once before the first batch."""

    def refuse(self, message: Message, trusted: TrustedKeys) -> str:
        """Why a correctly signed message must still not be processed ('' to process it), e.g.
        a frame whose origin the gateway did not attest; the runtime dead-letters it."""
        return ""

    def process(self, batch: list[Message]) -> list[Emit]:
        raise NotImplementedError

    def tick(self) -> list[Emit]:
        """Called about once a second, also when idle (e.g. to time out sessions)."""
        return []

    def stop(self) -> None:
        """Release resources; called once on shutdown."""


class PipeStage(Stage):
    """A stage with one output message per input frame, in order.

    Only messages of type `accepts` reach `handle`; rejections from earlier stages and
    session-end markers are passed on unchanged, so the recognizer sees every frame.
    """

    output: ClassVar[str]
    accepts: ClassVar[type[Message]]

    def handle(self, batch: list) -> list[Message]:
        raise NotImplementedError

    def process(self, batch: list[Message]) -> list[Emit]:
        work = [m for m in batch if isinstance(m, self.accepts)]
        results = iter(self._handle_checked(work) if work else [])
        out = [next(results) if isinstance(m, self.accepts) else m for m in batch]
        return [Emit(self.output, m.encode(), partition_key=session_of(m)) for m in out]

    def _handle_checked(self, work: list[Message]) -> list[Message]:
        """`handle`'s results, or a StageContractError naming the stage: a miscount would pair
        results with the wrong frames (or lose frames), and the sessions would decide on them."""
        results = list(self.handle(work))
        if len(results) != len(work):
            raise StageContractError(
                f"stage {self.name!r}: {type(self).__name__}.handle returned {len(results)} results for "
                f"{len(work)} inputs; it must return exactly one message per input, in order"
            )
        strangers = [type(r).__name__ for r in results if not isinstance(r, Message)]
        if strangers:
            raise StageContractError(
                f"stage {self.name!r}: {type(self).__name__}.handle returned {', '.join(sorted(set(strangers)))} "
                f"where messages were expected"
            )
        return results
