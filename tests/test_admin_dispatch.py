"""How the recognizer dispatches operator commands (services/recognizer/admin.py)."""

from __future__ import annotations

import msgpack
import pytest

from facepay.messages import AdminMsg, FrameRef
from services.recognizer import admin


def command(name: str, **args) -> AdminMsg:
    ref = FrameRef(session_id="admin-r1", store_id="", camera_id="admin", sequence=0, captured_ms=0)
    return AdminMsg(ref=ref, command=name, args=args, request_id="r1")


def reply_of(emit) -> dict:
    return msgpack.unpackb(emit.payload[b"m"])


def test_an_unknown_command_name_is_reported_as_unknown_with_the_known_ones():
    reply = reply_of(admin.handle_admin(None, command("list_usres")))
    assert reply["ok"] is False
    assert "unknown command 'list_usres'" in reply["error"] and "list_users" in reply["error"]


def test_a_key_error_inside_a_known_command_is_not_reported_as_an_unknown_command(monkeypatch):
    def show_user_with_a_bug(stage, user_id: str) -> dict:
        return {}["templates"]

    monkeypatch.setitem(admin._COMMANDS, "show_user", show_user_with_a_bug)
    # An unexpected error is the worker's to handle like any other (retried, then dead-lettered with
    # its error), never an "unknown command" reply that would send the operator hunting for a typo.
    with pytest.raises(KeyError, match="templates"):
        admin.handle_admin(None, command("show_user", user_id="alice"))


def test_bad_arguments_to_a_known_command_are_reported_as_such():
    reply = reply_of(admin.handle_admin(None, command("show_user", user="alice")))
    assert reply["ok"] is False and "unknown command" not in reply["error"] and "user" in reply["error"]


def test_operator_commands_depend_on_the_gallery_owner_not_on_the_stage():
    """admin.py and stage.py used to import each other (admin for its type hints); commands now
    act on `admin.Operated` (the gallery owner and the failure limits), so the imports go one way."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(admin.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "services.recognizer.stage" not in imported
    assert "services.recognizer.gallery_owner" in imported
