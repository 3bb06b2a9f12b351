"""Wheel build step that pyproject.toml cannot express: the gRPC contract ships compiled.

The .proto is copied into the package (`facepay/proto/facepay/v1/facepay.proto`) and compiled
into `facepay/v1/`, so an installed facepay imports its contract without writing into
site-packages (a container's read-only root file system) and without the source tree.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _codegen():
    # Loaded by path: importing the facepay package would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("contract_codegen", ROOT / "facepay" / "contract_codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithContract(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install compiles in the source tree on first import
            return
        codegen = _codegen()
        build_lib = Path(self.build_lib)
        packaged_proto = build_lib / "facepay" / "proto" / codegen.PROTO_RELATIVE
        packaged_proto.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "proto" / codegen.PROTO_RELATIVE, packaged_proto)
        shutil.rmtree(build_lib / "facepay" / "v1", ignore_errors=True)
        codegen.compile_proto(build_lib / "facepay" / "proto", build_lib)


setup(cmdclass={"build_py": BuildPyWithContract})
