"""Keys for components that tests run in-process (a gateway, a stage): one keyset per test run."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from facepay import keys


@lru_cache(maxsize=1)
def test_keyset() -> Path:
    """`facepay keys generate` into a private temporary folder, removed when the run ends."""
    folder = Path(tempfile.mkdtemp(prefix="facepay-keys-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    keys.generate(folder)
    return folder


def signing_as(component: str) -> dict[str, str]:
    """Settings overrides that let `component` sign what it writes and verify what it reads."""
    folder = test_keyset()
    return {"key_file": str(folder / f"{component}.key"), "trusted_keys_file": str(folder / "trusted.yaml")}
