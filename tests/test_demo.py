"""`facepay demo` — the README's first command — on a machine without the test data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_runs_on_the_built_in_face_and_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "FACEPAY_TEST_DATA": str(tmp_path / "no-data-here")}
    done = subprocess.run([sys.executable, "-m", "facepay", "demo", "--workdir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "blink-liveness rule is relaxed" in out, "the demo says which rule it relaxes"
    assert "recognizer: dlib-resnet-v1 (CC0" in out, "the demo names its recognizer and that recognizer's licence"
    assert "enroll astronaut" in out and "ENROLLED" in out
    assert "APPROVE user=astronaut" in out
    assert "DECLINE reason=no_face" in out
    assert "no process left behind" in out
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout
    assert leftover.strip() == ""
