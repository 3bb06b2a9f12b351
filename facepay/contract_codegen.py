"""Compiling the gRPC contract into Python: shared by `facepay.contract` (source tree, on first
import) and setup.py (wheel build), so an installed package ships code generated the same way.

Free of side effects and of imports from the rest of facepay: setup.py loads this file by path,
before the package (or its dependencies) is importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PROTO_RELATIVE = Path("facepay") / "v1" / "facepay.proto"
STAMP_NAME = ".proto-sha256"


def proto_digest(proto_file: Path) -> str:
    return hashlib.sha256(proto_file.read_bytes()).hexdigest()


def compile_proto(proto_root: Path, out_root: Path) -> Path:
    """Generate `facepay/v1` (messages, stubs, type stubs, stamp) under `out_root`; returns it."""
    from grpc_tools import protoc

    proto_file = proto_root / PROTO_RELATIVE
    args = [
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        str(proto_file),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_file}")
    built = out_root / "facepay" / "v1"
    (built / "__init__.py").write_text('"""Generated from proto/facepay/v1; do not edit."""\n')
    (built / STAMP_NAME).write_text(proto_digest(proto_file))
    return built
