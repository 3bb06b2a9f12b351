"""The public gRPC contract (`proto/facepay/v1/facepay.proto`), compiled on first use.

Generated code is never committed or hand-edited. In a source tree it is built into
`facepay/v1/` at test time (`facepay contract build`, also on first import) and rebuilt whenever
the .proto changes. A wheel ships it already built (setup.py), with the .proto as package data
(`facepay/proto/`), so an installed package never writes into its own directory.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from facepay.contract_codegen import PROTO_RELATIVE, STAMP_NAME, compile_proto, proto_digest

PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGED_PROTO_ROOT = PACKAGE_DIR / "proto"  # installed from a wheel
_SOURCE_PROTO_ROOT = PACKAGE_DIR.parent / "proto"  # a source checkout
PROTO_ROOT = _PACKAGED_PROTO_ROOT if (_PACKAGED_PROTO_ROOT / PROTO_RELATIVE).exists() else _SOURCE_PROTO_ROOT
PROTO_FILE = PROTO_ROOT / PROTO_RELATIVE
GENERATED_DIR = PACKAGE_DIR / "v1"
_STAMP = GENERATED_DIR / STAMP_NAME


def _proto_digest() -> str:
    if not PROTO_FILE.exists():
        raise FileNotFoundError(
            f"the gRPC contract {PROTO_RELATIVE} is neither in the package ({_PACKAGED_PROTO_ROOT}) "
            f"nor in a source tree ({_SOURCE_PROTO_ROOT}); reinstall facepay"
        )
    return proto_digest(PROTO_FILE)


def is_current() -> bool:
    """Whether facepay/v1 was generated from the .proto as it is now."""
    return _STAMP.exists() and _STAMP.read_text() == _proto_digest()


def build(force: bool = False) -> Path:
    """Compile the proto into facepay/v1 unless it is up to date; safe with concurrent callers."""
    if not force and is_current():
        return GENERATED_DIR
    with tempfile.TemporaryDirectory(dir=PACKAGE_DIR.parent) as tmp:
        built = compile_proto(PROTO_ROOT, Path(tmp))
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


if TYPE_CHECKING:  # the type checker reads the generated messages through their .pyi
    from facepay.v1 import facepay_pb2 as pb
    from facepay.v1 import facepay_pb2_grpc as rpc
else:
    pb, rpc = _load()


def reason_code(reason: int) -> str:
    """Stable lower-case code of a Reason enum value, as events and logs carry it."""
    return pb.Reason.Name(reason).lower()


def reason_value(code: str) -> pb.Reason:
    return pb.Reason.Value(code.upper())
