"""Settings: a typo or an out-of-range value is an error naming the setting, never ignored."""

from __future__ import annotations

import logging
import typing
from dataclasses import fields, is_dataclass

import pytest

from facepay.config import BOUNDS, SessionPolicy, Settings, SettingsError, load_settings


def from_yaml(tmp_path, text: str, **env: str) -> Settings:
    config = tmp_path / "facepay.yaml"
    config.write_text(text)
    return load_settings({"FACEPAY_CONFIG": str(config), **env})


def test_yaml_and_env_values_reach_every_level(tmp_path):
    settings = from_yaml(
        tmp_path,
        "batch_size: 4\npolicy:\n  min_agreeing_frames: 2\n  threshold: 0.6\n",
        FACEPAY_POSE_MAX_ABS_YAW="30",
        FACEPAY_POLICY_REQUIRE_BLINK="false",
    )
    assert settings.batch_size == 4 and settings.policy.min_agreeing_frames == 2 and settings.policy.threshold == 0.6
    assert settings.pose.max_abs_yaw == 30.0 and settings.policy.require_blink is False


def test_a_typo_at_the_top_level_of_the_yaml_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match=r"batch_sise.*batch_size"):
        from_yaml(tmp_path, "batch_sise: 4\n")


def test_a_typo_inside_a_section_of_the_yaml_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(SettingsError, match=r"policy\.min_agreing_frames.*did you mean.*min_agreeing_frames"):
        from_yaml(tmp_path, "policy:\n  min_agreing_frames: 2\n")


def test_a_section_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match=r"policy"):
        from_yaml(tmp_path, "policy: strict\n")


def test_a_typo_in_a_section_environment_variable_is_an_error():
    with pytest.raises(SettingsError, match=r"FACEPAY_POLICY_MIN_AGREING_FRAMES"):
        load_settings({"FACEPAY_POLICY_MIN_AGREING_FRAMES": "2"})


def test_an_unknown_top_level_facepay_variable_is_warned_about_not_fatal(caplog):
    # FACEPAY_ is shared with variables that are not settings (FACEPAY_TEST_DATA, FACEPAY_MODEL_CACHE, …).
    with caplog.at_level(logging.WARNING, logger="facepay.config"):
        settings = load_settings({"FACEPAY_BATCH_SISE": "4", "FACEPAY_TEST_DATA": "/data"})
    assert settings.batch_size == Settings().batch_size
    assert "FACEPAY_BATCH_SISE" in caplog.text and "FACEPAY_BATCH_SIZE" in caplog.text
    assert "FACEPAY_TEST_DATA" not in caplog.text


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("FACEPAY_POLICY_THRESHOLD", "1.5", r"policy\.threshold.*\[-1, 1\]"),
        ("FACEPAY_POLICY_MIN_AGREEING_FRAMES", "0", r"policy\.min_agreeing_frames.*≥ 1"),
        ("FACEPAY_POLICY_MAX_DISAGREEING_RATIO", "1.2", r"policy\.max_disagreeing_ratio.*\[0, 1\]"),
        ("FACEPAY_POLICY_SESSION_TIMEOUT_S", "0", r"policy\.session_timeout_s.*> 0"),
        ("FACEPAY_LIMITS_MAX_CONSECUTIVE", "0", r"limits\.max_consecutive.*≥ 1"),
        ("FACEPAY_METRICS_PORT", "70000", r"metrics_port.*0\.\.65535"),
        ("FACEPAY_GRPC_ADDRESS", "127.0.0.1:99999", r"grpc_address.*port.*0\.\.65535"),
        ("FACEPAY_BATCH_SIZE", "0", r"batch_size.*≥ 1"),
        ("FACEPAY_LOG_FORMAT", "xml", r"log_format.*json.*text"),
    ],
)
def test_out_of_range_values_are_errors_naming_the_setting(variable, value, message):
    with pytest.raises(SettingsError, match=message):
        load_settings({variable: value})


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("FACEPAY_BATCH_SIZE", "sixteen", r"batch_size.*integer.*'sixteen'"),
        ("FACEPAY_POLICY_REQUIRE_BLINK", "maybe", r"policy\.require_blink.*true or false.*'maybe'"),
        ("FACEPAY_POLICY_MARGIN", "a bit", r"policy\.margin.*number"),
    ],
)
def test_values_that_are_not_of_the_settings_type_are_errors_naming_it(variable, value, message):
    with pytest.raises(SettingsError, match=message):
        load_settings({variable: value})


def test_yaml_values_of_the_wrong_type_are_errors_naming_the_setting(tmp_path):
    with pytest.raises(SettingsError, match=r"policy\.min_agreeing_frames.*integer"):
        from_yaml(tmp_path, "policy:\n  min_agreeing_frames: three\n")
    with pytest.raises(SettingsError, match=r"policy\.require_blink.*true or false"):
        from_yaml(tmp_path, "policy:\n  require_blink: 1\n")


def test_rules_across_settings_are_checked():
    with pytest.raises(SettingsError, match=r"blink_closed_ratio.*blink_open_ratio"):
        Settings(policy=SessionPolicy(blink_closed_ratio=0.95, blink_open_ratio=0.9))


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(SettingsError, match=r"policy\.threshold"):
        Settings().replace(policy=SessionPolicy(threshold=-3.0))


def test_the_defaults_and_a_round_trip_through_the_environment_are_valid():
    from facepay.app.supervisor import settings_to_env

    settings = Settings(policy=SessionPolicy(threshold=0.55, min_passive_liveness=0.4))
    assert load_settings(settings_to_env(settings)) == settings
    assert load_settings({}) == Settings()


def numeric_settings(cls=Settings, prefix: str = "") -> list[str]:
    names = []
    for f in fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if is_dataclass(kind):
            names += numeric_settings(kind, f"{f.name}.")
        elif {int, float} & set(typing.get_args(kind) or (kind,)) and kind is not bool:
            names.append(prefix + f.name)
    return names


def test_every_numeric_setting_declares_its_range():
    # A new numeric setting gets its entry in facepay.config.BOUNDS: nothing reaches a worker unchecked.
    assert [name for name in numeric_settings() if name not in BOUNDS] == []


def test_the_cli_reports_a_configuration_error_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    config = tmp_path / "facepay.yaml"
    config.write_text("policy:\n  min_agreing_frames: 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "facepay", "config", "show"],
        capture_output=True,
        text=True,
        env={**os.environ, "FACEPAY_CONFIG": str(config)},
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "policy.min_agreing_frames" in done.stderr and "min_agreeing_frames" in done.stderr
