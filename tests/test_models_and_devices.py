"""Model cache and device choice: a missing or altered weight file, or CUDA asked for where
there is none, fails loudly with the fix in the message — never a silent fallback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from facepay.models import cache
from facepay.models.device import DeviceUnavailableError, autocast_dtype, resolve_device
from tests.keysets import signing_as


def test_auto_picks_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_raises_with_the_fix():
    with pytest.raises(DeviceUnavailableError, match="FACEPAY_DEVICE=cpu"):
        resolve_device("cuda")


def test_fp16_only_on_cuda():
    assert autocast_dtype(torch.device("cpu")) == torch.float32
    assert autocast_dtype(torch.device("cuda")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_worker_told_to_use_cuda_without_it_fails_at_start_up(tmp_path):
    env = {
        "FACEPAY_DEVICE": "cuda",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PATH": "/usr/bin:/bin",
        "FACEPAY_MODEL_CACHE": str(cache.cache_dir()),
        **{f"FACEPAY_{name.upper()}": path for name, path in signing_as("detector").items()},
    }
    done = subprocess.run(
        [sys.executable, "-m", "facepay", "worker", "detector"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr


def test_a_missing_weight_file_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPAY_MODEL_CACHE", str(tmp_path))
    with pytest.raises(cache.ModelMissingError, match="facepay models fetch"):
        cache.weight_path("mtcnn_pnet.pt")
    assert cache.status("mtcnn_pnet.pt") == "missing"


def test_an_altered_weight_file_is_refused(tmp_path, monkeypatch):
    source = cache.weight_path("mtcnn_pnet.pt")
    monkeypatch.setenv("FACEPAY_MODEL_CACHE", str(tmp_path))
    altered = tmp_path / "mtcnn_pnet.pt"
    shutil.copy(source, altered)
    with open(altered, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(cache.ModelMissingError, match="sha256"):
        cache.weight_path("mtcnn_pnet.pt")
    assert cache.status("mtcnn_pnet.pt") == "corrupt"
