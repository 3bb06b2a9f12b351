"""The pipeline stages (the four of a payment, and the archiver) by name (imported lazily: a worker loads only its own models)."""

from __future__ import annotations

import importlib

from facepay.config import Settings
from facepay.runtime.stage import Stage

STAGES = {
    "detector": "services.detector.stage:DetectorStage",
    "aligner": "services.aligner.stage:AlignerStage",
    "pose": "services.pose.stage:PoseStage",
    "recognizer": "services.recognizer.stage:RecognizerStage",
    "archiver": "services.archiver.stage:ArchiverStage",
}


def create_stage(name: str, settings: Settings) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)(settings)
