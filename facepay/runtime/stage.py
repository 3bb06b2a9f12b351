"""What a stage is: a small class that turns a batch of messages into messages.

Stages know nothing of Redis. The runtime (`facepay.runtime.worker`) reads their input stream
as a consumer group, calls `process`, and writes what it returns while acknowledging the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from facepay.keys import TrustedKeys
from facepay.messages import Message


@dataclass(frozen=True)
class Emit:
    """One entry to write. With `once_key` it is written only if that key was never set."""

    stream: str  # stream name inside the namespace, e.g. "faces"
    payload: bytes | dict[bytes, bytes]
    once_key: str | None = None


class StageBacklog(RuntimeError):
    """A dependency outside Redis cannot take the batch for now (the archive's object store is
    down): the runtime holds the batch pending and retries it with a backoff, like a Redis
    refusal. Never counted as a failure, never dead-lettered; the group's lag shows it."""


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
        return [Emit(self.output, m.encode()) for m in out]

    def _handle_checked(self, work: list[Message]) -> list[Message]:
        """`handle`'s results, or a StageContractError naming the stage: a miscount would pair
        results with the wrong frames (or lose frames), and the sessions would decide on them."""
        results = list(self.handle(work))
        if len(results) != len(work):
            raise StageContractError(
                f"stage {self.name!r}: {type(self).__name__}.handle returned {len(results)} results for "
                f"{len(work)} inputs; it must return exactly one message per input, in order")
        strangers = [type(r).__name__ for r in results if not isinstance(r, Message)]
        if strangers:
            raise StageContractError(
                f"stage {self.name!r}: {type(self).__name__}.handle returned {', '.join(sorted(set(strangers)))} "
                f"where messages were expected")
        return results
