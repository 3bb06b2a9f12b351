"""A calibrated threshold is stored per template space and is what recognizers then use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis

from facepay import keys, thresholds
from facepay.config import SessionPolicy, Settings
from facepay.runtime.embedded import EmbeddedValkey


@pytest.fixture
def keyset(tmp_path):
    keys.generate(tmp_path / "keys")
    return tmp_path / "keys"


def operator(keyset) -> keys.Signer:
    return keys.load_signer(str(keyset / "operator.key"))


def test_a_setting_beats_a_calibration_which_beats_the_model_default(tmp_path, keyset):
    trusted = keys.load_trusted(str(keyset / "trusted.yaml"))
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, namespace="th")
        assert thresholds.effective(client, settings, "m+lm", 0.9, trusted) == (0.9, "model default")
        thresholds.store(client, settings, "m+lm", 0.9537501, operator(keyset), target_far=1e-5)
        assert thresholds.effective(client, settings, "m+lm", 0.9, trusted) == (0.9537501, "calibrated"), (
            "full precision"
        )
        pinned = settings.replace(policy=SessionPolicy(threshold=0.97))
        assert thresholds.effective(client, pinned, "m+lm", 0.9, trusted) == (0.97, "setting")


def test_a_threshold_a_redis_writer_stores_or_moves_is_ignored(tmp_path, keyset):
    """Issue 9: anyone who could write the thresholds hash could lower the bar to approve anyone."""
    trusted = keys.load_trusted(str(keyset / "trusted.yaml"))
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, namespace="th")
        client.hset("th:thresholds", "m+lm", json.dumps({"threshold": 0.1, "stored_at_ms": 1}))  # pre-signing format
        assert thresholds.effective(client, settings, "m+lm", 0.9, trusted) == (0.9, "model default")
        thresholds.store(client, settings, "m+lm", 0.1, keys.load_signer(str(keyset / "recognizer.key")))
        assert thresholds.effective(client, settings, "m+lm", 0.9, trusted) == (0.9, "model default"), (
            "only the operator's key signs thresholds"
        )
        thresholds.store(client, settings, "other+lm", 0.1, operator(keyset))
        client.hset("th:thresholds", "m+lm", client.hget("th:thresholds", "other+lm"))
        assert thresholds.effective(client, settings, "m+lm", 0.9, trusted) == (0.9, "model default"), (
            "a record signed for another template space does not count here"
        )
        stored = json.loads(client.hget("th:thresholds", "other+lm"))
        stored["record"]["threshold"] = 0.05
        client.hset("th:thresholds", "other+lm", json.dumps(stored))
        assert thresholds.effective(client, settings, "other+lm", 0.9, trusted) == (0.9, "model default")


def test_the_recognizer_never_goes_back_to_an_older_signed_threshold(tmp_path, keyset):
    trusted = keys.load_trusted(str(keyset / "trusted.yaml"))
    with EmbeddedValkey(tmp_path / "vk") as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url, namespace="th")
        thresholds.store(client, settings, "m+lm", 0.80, operator(keyset))
        old = client.hget("th:thresholds", "m+lm")
        time.sleep(0.01)  # a later stored_at_ms
        thresholds.store(client, settings, "m+lm", 0.95, operator(keyset))
        in_use = thresholds.CalibratedThreshold(client, settings, "m+lm", 0.9, trusted)
        assert in_use.current() == (0.95, "calibrated")
        client.hset("th:thresholds", "m+lm", old)  # a replay of the genuinely signed older record
        assert in_use.current() == (0.95, "calibrated")
        client.hdel("th:thresholds", "m+lm")
        assert in_use.current() == (0.95, "calibrated"), "deleting the record does not restore the default either"


@pytest.mark.slow  # `facepay calibrate` as a process: loads the models, scores every pair
def test_facepay_calibrate_reports_and_stores_the_threshold(faces, tmp_path):
    with EmbeddedValkey(tmp_path / "vk") as server:
        keys.generate(tmp_path / "keys")
        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "FACEPAY_NAMESPACE": "cal",
            "FACEPAY_DEVICE": "cpu",
            "FACEPAY_OPERATOR_KEY_FILE": str(tmp_path / "keys" / "operator.key"),
            "FACEPAY_TRUSTED_KEYS_FILE": str(tmp_path / "keys" / "trusted.yaml"),
        }
        out = tmp_path / "report"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "facepay",
                "calibrate",
                "--data",
                str(faces.root),
                "--target-far",
                "1e-3",
                "--out",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert {"report.json", "report.md", "det.png", "roc.png"} <= {p.name for p in out.iterdir()}
        report = json.loads((out / "report.json").read_text())
        client = redis.Redis.from_url(server.url)
        (space,) = client.hkeys("cal:thresholds")
        assert space == b"dlib-resnet-v1+facemesh"
        trusted = keys.load_trusted(str(tmp_path / "keys" / "trusted.yaml"))
        settings = Settings(redis_url=server.url, namespace="cal")
        assert thresholds.effective(client, settings, space.decode(), 0.5, trusted) == (
            report["threshold"],
            "calibrated",
        )


def test_facepay_calibrate_without_the_operator_key_stores_nothing_and_says_why(tmp_path):
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "FACEPAY_OPERATOR_KEY_FILE": ""}
    done = subprocess.run(
        [sys.executable, "-m", "facepay", "calibrate", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "FACEPAY_OPERATOR_KEY_FILE" in done.stderr and "facepay keys generate" in done.stderr
