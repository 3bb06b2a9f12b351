"""The one-machine supervisor (`facepay demo`, the end-to-end tests): what it leaves behind."""

from __future__ import annotations

import pytest
import torch

from facepay.app.supervisor import Pipeline, demo_access
from facepay.config import Settings
from facepay.runtime.embedded import EmbeddedValkey


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="needs a worker that fails at start: here CUDA asked for and absent"
)
def test_a_pipeline_that_fails_to_start_leaves_no_server_or_worker_running(tmp_path):
    # A detector asked to run on a GPU the machine lacks exits at start (by design: loudly).
    pipeline = Pipeline(
        Settings(device="cuda"),
        tmp_path,
        demo_access({"store-1": ["cam-1"]}),
        replicas={"aligner": 0, "pose": 0, "recognizer": 0, "archiver": 1},
        gateway=False,
    )
    with pytest.raises(RuntimeError, match="detector-0 exited"):
        pipeline.start(timeout_s=60)

    assert isinstance(pipeline.valkey, EmbeddedValkey) and pipeline.valkey.process is not None
    assert pipeline.valkey.process.poll() is not None, "embedded Valkey left running"
    assert pipeline.s3 is not None and pipeline.s3.process is not None
    assert pipeline.s3.process.poll() is not None, "embedded SeaweedFS left running"
    assert not pipeline.processes, "workers left running"
