"""The layers are one way: application (facepay/app/) → stages (services/<stage>/) → platform
(the rest of facepay/), and stages do not import each other. The contracts are in
pyproject.toml (`[tool.importlinter]`); this runs them, so `make test` fails on a wrong import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import facepay

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _layers_contract() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_no_module_imports_against_the_layers():
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_module_of_facepay_is_platform_or_application():
    """A new module must be placed: a module the platform layer does not list would escape the
    contract (it could import services, and the platform could import it)."""
    *above, platform = _layers_contract()
    listed = {name.strip().strip("()") for name in platform.split(":")}
    application = {"facepay.__main__", "facepay.app"}
    assert set(above) == application | {"services"}
    top_level = {f"facepay.{m.name}" for m in pkgutil.iter_modules(facepay.__path__)} - {"facepay.v1"}  # generated
    assert top_level - application == listed - {"facepay.v1"}, (
        "list each new module of facepay/ in the platform layer of pyproject.toml, or move it to facepay/app/"
    )
