"""Operator commands that the recognizer, as the gallery's owner, carries out.

They travel on the recognizer's own input stream (so with the embedded gallery, which one
process owns, the owner does every write) and are answered on `{ns}:admin-replies`. A command
acts on the gallery's owner and the failure limits (`Operated`), never on the stage itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import msgpack
import numpy as np

from facepay.messages import AdminMsg
from facepay.runtime.stage import Emit
from services.recognizer.erasure import erase_user_traces
from services.recognizer.gallery_owner import GalleryOwner
from services.recognizer.limits import FailureLimiter

log = logging.getLogger(__name__)


class Operated(Protocol):
    """What operator commands act on (the recognizer stage holds both)."""

    @property
    def gallery_owner(self) -> GalleryOwner: ...

    @property
    def limits(self) -> FailureLimiter: ...


def admin_problem(owner: GalleryOwner, message: AdminMsg) -> str:
    """Why a command signed by the operator is still refused: stale, or a replay of one seen."""
    max_age_s = owner.settings.admin_max_age_s
    if abs(time.time() * 1000 - message.issued_at_ms) > max_age_s * 1000:
        return f"admin command issued more than {max_age_s} s from now (stale or replayed)"
    seen = owner.settings.key("admin-requests", message.request_id)
    if not message.request_id or not owner.redis.set(seen, 1, nx=True, ex=2 * max_age_s + 60):
        return f"admin request id {message.request_id!r} already seen (replayed)"
    return ""


def handle_admin(target: Operated, message: AdminMsg) -> Emit:
    command = _COMMANDS.get(message.command)
    if command is None:
        result = {"ok": False, "error": f"unknown command {message.command!r}; known: {', '.join(_COMMANDS)}"}
    else:
        try:
            result = {"ok": True, **command(target, **message.args)}
        except (TypeError, ValueError) as exc:
            result = {"ok": False, "error": str(exc)}
    log.info("admin command", extra={"command": message.command, "ok": result["ok"]})
    result["request_id"] = message.request_id  # inside the signed body: a reply cannot be re-labelled
    return Emit("admin-replies", {b"request": message.request_id.encode(), b"m": msgpack.packb(result)})


def _list_users(target: Operated, tenant: str = "", space: str = "") -> dict:
    owner = target.gallery_owner
    space = space or owner.space_id
    return {"model_id": space, "users": owner.list_users(tenant, space)}


def _show_user(target: Operated, user_id: str) -> dict:
    owner = target.gallery_owner
    templates = owner.describe_user(user_id)
    return {
        "model_id": owner.space_id,
        "user_id": user_id,
        "enrolled": bool(templates),
        "templates": [{k: v for k, v in t.items() if k != "user_id"} for t in templates],
    }


def _delete_user(target: Operated, user_id: str) -> dict:
    """Right to erasure: every template (mean and samples) of the user in every template space,
    the chips kept for re-indexing, their failure counts and their traces in Redis."""
    owner = target.gallery_owner
    removed = owner.delete_user(user_id)
    target.limits.reset("user", user_id)
    erased = erase_user_traces(owner.redis, owner.settings, user_id)
    log.info("user deleted", extra={"templates_removed": removed, **erased})  # no user id: it is erased
    return {"user_id": user_id, "templates_removed": removed}


def _reset_lockout(target: Operated, kind: str, subject: str) -> dict:
    if kind not in ("camera", "user"):
        raise ValueError("kind must be camera or user")
    return {"kind": kind, "subject": subject, "cleared": target.limits.reset(kind, subject)}


def _store_templates(
    target: Operated, space: str, user_id: str, tenant: str, phone_suffix: str, samples: list[list[float]]
) -> dict:
    """A re-index job's result: the user's templates under another model, written by the owner."""
    stored = target.gallery_owner.store_templates(space, user_id, tenant, phone_suffix, np.asarray(samples, np.float32))
    return {"space": space, "user_id": user_id, "templates": stored}


_COMMANDS: dict[str, Callable[..., dict]] = {
    "list_users": _list_users,
    "show_user": _show_user,
    "delete_user": _delete_user,
    "reset_lockout": _reset_lockout,
    "store_templates": _store_templates,
}
