"""The end-to-end tests' own helpers (tests/e2e.py) fail loudly, naming what they waited for."""

from __future__ import annotations

import types
import uuid

import grpc
import pytest

from facepay.app.supervisor import demo_access
from facepay.config import Settings
from facepay.runtime.embedded import EmbeddedValkey, free_port
from services.gateway.cameras import CameraRegistry
from services.gateway.server import serve
from tests.e2e import Backend, wait_until
from tests.keysets import signing_as


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A real gateway on a real Valkey: all a payment backend talks to."""
    access = demo_access({"store-1": ["cam-1"]})
    with EmbeddedValkey(tmp_path_factory.mktemp("vk")) as valkey:
        settings = Settings(
            redis_url=valkey.url,
            namespace=f"h{uuid.uuid4().hex[:6]}",
            grpc_address=f"127.0.0.1:{free_port()}",
            **signing_as("gateway"),
        )
        server = serve(settings, CameraRegistry.from_dict(access))
        yield types.SimpleNamespace(
            address=settings.grpc_address,
            access=access,
            settings=settings,
            channel=lambda: grpc.insecure_channel(settings.grpc_address),
        )
        server.stop(0)


def test_a_backend_waiting_past_its_timeout_names_the_sessions_never_decided(gateway):
    backend = Backend(gateway, "store-1")
    try:
        with pytest.raises(TimeoutError, match=r"pos-never-1, pos-never-2"):
            backend.wait_for(["pos-never-1", "pos-never-2"], timeout_s=0.5)
    finally:
        backend.close()


def test_waiting_for_a_condition_that_never_holds_says_what_was_awaited():
    with pytest.raises(AssertionError, match="the sun to set twice"):
        wait_until(lambda: False, timeout_s=0.2, what="the sun to set twice")
