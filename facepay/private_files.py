"""Files of secrets (keys, tokens, passwords, certificates' keys): readable by their owner only."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path | str, text: str) -> None:
    """Create (or replace) a file readable by its owner only — never briefly world-readable, and
    never half-written: the text goes to a 0600 temporary file that is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a left-over temporary file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
