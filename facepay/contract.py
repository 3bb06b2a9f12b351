"""The public gRPC contract (`proto/facepay/v1/facepay.proto`), compiled on first use.

Generated code is never committed or hand-edited: it is built into `facepay/v1/` at install or
test time (`facepay contract build`) and rebuilt whenever the .proto changes.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "proto"
PROTO_FILE = PROTO_ROOT / "facepay" / "v1" / "facepay.proto"
GENERATED_DIR = PACKAGE_DIR / "v1"
_STAMP = GENERATED_DIR / ".proto-sha256"


def _proto_digest() -> str:
    return hashlib.sha256(PROTO_FILE.read_bytes()).hexdigest()


def build(force: bool = False) -> Path:
    """Compile the proto into facepay/v1 unless it is up to date; safe with concurrent callers."""
    digest = _proto_digest()
    if not force and _STAMP.exists() and _STAMP.read_text() == digest:
        return GENERATED_DIR
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(dir=PACKAGE_DIR.parent) as tmp:
        args = [
            "protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}", str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        built = Path(tmp) / "facepay" / "v1"
        (built / "__init__.py").write_text('"""Generated from proto/facepay/v1; do not edit."""\n')
        (built / ".proto-sha256").write_text(digest)
        staging = PACKAGE_DIR / f".v1-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(str(built), staging)
        shutil.rmtree(GENERATED_DIR, ignore_errors=True)
        try:
            staging.rename(GENERATED_DIR)
        except OSError:  # another process won the race with the same content
            shutil.rmtree(staging, ignore_errors=True)
    importlib.invalidate_caches()
    return GENERATED_DIR


def _load() -> tuple[ModuleType, ModuleType]:
    build()
    return (
        importlib.import_module("facepay.v1.facepay_pb2"),
        importlib.import_module("facepay.v1.facepay_pb2_grpc"),
    )


pb, rpc = _load()


def reason_code(reason: int) -> str:
    """Stable lower-case code of a Reason enum value, as events and logs carry it."""
    return pb.Reason.Name(reason).lower()


def reason_value(code: str) -> int:
    return pb.Reason.Value(code.upper())
