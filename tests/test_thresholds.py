"""A calibrated threshold is stored per template space and is what recognizers then use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from facepay import thresholds
from facepay.config import SessionPolicy, Settings
from facepay.runtime.embedded import EmbeddedValkey


def test_a_setting_beats_a_calibration_which_beats_the_model_default(tmp_path):
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, namespace="th")
        assert thresholds.effective(client, settings, "m+lm", 0.9) == (0.9, "model default")
        thresholds.store(client, settings, "m+lm", 0.9537501, target_far=1e-5)
        assert thresholds.effective(client, settings, "m+lm", 0.9) == (0.9537501, "calibrated"), "full precision"
        pinned = settings.replace(policy=SessionPolicy(threshold=0.97))
        assert thresholds.effective(client, pinned, "m+lm", 0.9) == (0.97, "setting")


@pytest.mark.slow  # `facepay calibrate` as a process: loads the models, scores every pair
def test_facepay_calibrate_reports_and_stores_the_threshold(faces, tmp_path):
    with EmbeddedValkey(tmp_path / "vk") as server:
        env = {**os.environ, "REDIS_URL": server.url, "FACEPAY_NAMESPACE": "cal", "FACEPAY_DEVICE": "cpu"}
        out = tmp_path / "report"
        done = subprocess.run([sys.executable, "-m", "facepay", "calibrate", "--data", str(faces.root),
                               "--target-far", "1e-3", "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert {"report.json", "report.md", "det.png", "roc.png"} <= {p.name for p in out.iterdir()}
        report = json.loads((out / "report.json").read_text())
        stored = redis.Redis.from_url(server.url).hgetall("cal:thresholds")
        (space, record), = stored.items()
        assert space == b"dlib-resnet-v1+facemesh"
        assert json.loads(record)["threshold"] == report["threshold"]
