"""How a payment session is named across the pipeline, and the key that says it is decided.

Sessions are the point of sale's transaction ids: unique within a store, not across stores, so
every piece of session state is keyed by both. The recognizer's decision is written once, under
`{ns}:decided:<session key>` (the runtime's once-key); the gateway reads the same key to refuse
frames for a session that is already decided. One spelling for both, here.
"""

from __future__ import annotations


def session_key(store_id: str, session_id: str) -> str:
    return f"{store_id}/{session_id}"


def decided_key(key: str) -> str:
    """The (namespace-relative) key set once `session_key` is decided."""
    return f"decided:{key}"
