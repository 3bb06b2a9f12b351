"""The package as a container image installs it: a built wheel, installed, run outside the source.

The wheel is built from a copy of the tracked sources (no generated code, no build leftovers),
installed with --no-deps into a fresh venv that sees the project venv's packages for the heavy
dependencies (torch, grpcio, …) through a plain path entry — not through the project venv's .pth
files, so the project's own editable install stays invisible — and run from a folder that holds
no source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_LEFTOVERS = shutil.ignore_patterns(
    ".git",
    ".venv",
    "var",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".v1-*",
    ".pytest_cache",
    "node_modules",
)


def _not_sources(folder: str, names: list[str]) -> set[str]:
    ignored = set(_LEFTOVERS(folder, names))
    if Path(folder) == REPO / "facepay":
        ignored.add("v1")  # code generated in the source tree: the wheel must build its own
    return ignored


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "facepay"
    shutil.copytree(REPO, source, ignore=_not_sources)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = out.glob("facepay-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed in it; returns its bin/ folder."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "project-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    # pip itself comes from the project venv through that path entry; it installs into the new venv.
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], check=True)
    return venv / "bin"


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(installed / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_the_wheel_ships_the_contract_compiled_and_its_proto(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "facepay/proto/facepay/v1/facepay.proto",
        "facepay/v1/__init__.py",
        "facepay/v1/facepay_pb2.py",
        "facepay/v1/facepay_pb2_grpc.py",
        "facepay/v1/.proto-sha256",
        "services/pose/stage.py",
    } <= names


def test_the_installed_wheel_runs_outside_the_source_tree_without_writing_into_itself(installed, tmp_path):
    (site_packages,) = installed.parent.glob("lib/python*/site-packages")
    package = site_packages / "facepay"
    before = _tree(package)

    cli_help = _run(installed, "facepay", "--help", cwd=tmp_path)
    assert cli_help.returncode == 0, cli_help.stderr
    assert "worker" in cli_help.stdout

    contract = _run(installed, "facepay", "contract", "build", cwd=tmp_path)
    assert contract.returncode == 0, contract.stderr
    assert contract.stdout.strip() == str(package / "v1")

    imports = _run(
        installed,
        "python",
        "-c",
        "import facepay.contract as c, services.pose.stage as s;"
        "print(c.__file__); print(s.__file__); print(c.PROTO_FILE); print(c.pb.DESCRIPTOR.package)",
        cwd=tmp_path,
    )
    assert imports.returncode == 0, imports.stderr
    contract_file, stage_file, proto_file, proto_package = imports.stdout.split()
    assert Path(contract_file).is_relative_to(site_packages)
    assert Path(stage_file).is_relative_to(site_packages)
    assert Path(proto_file) == package / "proto" / "facepay" / "v1" / "facepay.proto"
    assert proto_package == "facepay.v1"

    worker_help = _run(installed, "facepay", "worker", "pose", "--help", cwd=tmp_path)
    assert worker_help.returncode == 0, worker_help.stderr

    assert _tree(package) == before, "the installed package wrote into its own directory"
