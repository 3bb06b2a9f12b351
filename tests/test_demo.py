"""`facepay demo` — the README's first command — on a machine without the test data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_runs_on_the_built_in_face_and_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "FACEPAY_TEST_DATA": str(tmp_path / "no-data-here")}
    done = subprocess.run(
        [sys.executable, "-m", "facepay", "demo", "--workdir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "blink-liveness rule is relaxed" in out, "the demo says which rule it relaxes"
    assert "recognizer: dlib-resnet-v1 (CC0" in out, "the demo names its recognizer and that recognizer's licence"
    assert "enroll astronaut" in out and "ENROLLED" in out
    assert "APPROVE user=astronaut" in out
    assert "DECLINE reason=no_face" in out
    assert "audit archive: 2 of 2 sessions archived" in out and "hash chain verified" in out
    assert "no process left behind" in out
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


def test_the_demo_on_ones_own_photos_and_webm_video_runs_every_rule_and_says_why_photos_fail(faces, tmp_path):
    import cv2

    name, paths = next((n, ps) for n, ps in faces.identities().items() if len(ps) >= 3)
    dog = faces.path(faces.manifest("negative")[0]["path"])
    people = tmp_path / "people"
    (people / name).mkdir(parents=True)
    (people / "nobody").mkdir()
    for path in paths[:2] + [dog]:
        (people / name / path.name).write_bytes(path.read_bytes())
    (people / "nobody" / dog.name).write_bytes(dog.read_bytes())
    still = cv2.imread(str(paths[2]))
    writer = cv2.VideoWriter(str(tmp_path / "me.webm"), cv2.VideoWriter_fourcc(*"VP80"), 12, still.shape[1::-1])
    for _ in range(12):  # a still face, as a replayed photo would show it: it cannot blink
        writer.write(still)
    writer.release()
    env = {**os.environ, "FACEPAY_TEST_DATA": str(tmp_path / "no-data-here")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "facepay",
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--enroll",
            str(people),
            "--camera",
            str(tmp_path / "me.webm"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "relaxed" not in out, "nothing relaxed without --relax-liveness"
    assert f"enroll {name}" in out and "ENROLLED" in out and f"{dog.name}: rejected, no_face" in out
    assert "enroll nobody" in out and "REJECTED" in out
    session = next(line for line in out.splitlines() if "me.webm" in line)
    assert "12 frames" in session and "DECLINE" in session, session
    assert "[rules: 2 agreeing frames, margin 0.02, blink]" in session
    assert "no process left behind" in out
