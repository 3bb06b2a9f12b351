"""Pose: pitch, yaw and roll of the head from the landmarks; a face that is not frontal
enough is passed on as not eligible for identification, with the reason (pose_yaw …), so
the recognizer can decline a session of side views as "not_frontal".
"""

from __future__ import annotations

import numpy as np

from facepay.config import Settings
from facepay.messages import AlignedMsg, Message, PosedMsg
from facepay.runtime.stage import PipeStage
from services.pose.headpose import PoseGate, head_pose


class PoseStage(PipeStage):
    name = "pose"
    input = "aligned"
    output = "posed"
    accepts = AlignedMsg
    accepts_from = {t: frozenset({"aligner"}) for t in ("aligned", "rejection", "end")}

    def __init__(self, settings: Settings) -> None:
        self.gate = PoseGate.of(settings.pose)

    def handle(self, batch: list[AlignedMsg]) -> list[Message]:
        return [self._posed(face) for face in batch]

    def _posed(self, face: AlignedMsg) -> PosedMsg:
        pose = head_pose(np.asarray(face.landmarks, dtype=np.float32), face.crop_size)
        reason = self.gate.check(pose) or ""
        return PosedMsg(
            ref=face.ref,
            chips=face.chips,
            ear=face.ear,
            pitch=pose.pitch,
            yaw=pose.yaw,
            roll=pose.roll,
            eligible=not reason,
            reason=reason,
            models={**face.models, "pose": "pnp-68"},
            antispoof=face.antispoof,
            sharpness=face.sharpness,
            face_px=face.frame_box[2] - face.frame_box[0],
        )
