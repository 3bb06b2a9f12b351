"""Head pose (pitch, yaw, roll) from six iBUG-68 landmarks by PnP against a 3-D mean face.

Angles are in degrees and describe the face *as the camera sees it*: relative to the line of
sight through the face, not to the optical axis. For a face at the image centre the two are the
same; for an off-centre face (or a crop of a wider photo) the ray-relative pose is what decides
how frontal the face looks to a recogniser, and it does not depend on where the face sits.

Signs, with the image viewed as displayed (x to the right, y down):

- **yaw** > 0 when the person turns to *their* left, i.e. the nose moves towards image right;
- **pitch** > 0 when the person looks up (nose towards the top of the image);
- **roll** > 0 when the head tilts clockwise in the image (the image-left eye rises).

Precisely: with face-model axes x right, y down, z away from the camera (nose tip at the
origin) and R the model→camera rotation after removing the line-of-sight rotation,
R = Rz(roll) · Ry(−yaw) · Rx(−pitch) with right-handed elementary rotations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from facepay.vocabulary import Reason

if TYPE_CHECKING:
    from facepay.config import PoseLimits

# The six iBUG-68 points used: rigid and well spread (lids, brows and jaw outline move or
# are poorly localised), with their positions on a mean adult face in mm, axes as above.
# x/y: the iBUG 300-W mean 2-D shape (the annotation dlib's predictor was trained on) scaled
# to a 90 mm outer-eye-corner span, so a truly frontal face reads as pitch ≈ 0; z: depths
# behind the nose tip from OpenFace's 68-point 3-D mean face. The widespread "generic" model
# (eyes 27 mm behind the nose) is too shallow and over-reads yaw by ~40%.
POSE_LANDMARKS: tuple[int, ...] = (30, 8, 36, 45, 48, 54)
MEAN_FACE_MM: np.ndarray = np.array(
    [
        [0.0, 0.0, 0.0],  # 30 nose tip
        [0.0, 83.0, 36.1],  # 8 chin
        [-45.0, -36.5, 42.9],  # 36 outer corner of the image-left eye
        [45.0, -36.5, 42.9],  # 45 outer corner of the image-right eye
        [-28.8, 32.3, 34.2],  # 48 image-left mouth corner
        [28.8, 32.3, 34.2],  # 54 image-right mouth corner
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class HeadPose:
    pitch: float
    yaw: float
    roll: float


def camera_matrix(image_size: tuple[int, int]) -> np.ndarray:
    """Pinhole intrinsics for an uncalibrated camera: focal ≈ image width, centre principal point."""
    w, h = image_size
    return np.array([[w, 0.0, w / 2.0], [0.0, w, h / 2.0], [0.0, 0.0, 1.0]], dtype=np.float64)


def rotation_from_pose(pose: HeadPose) -> np.ndarray:
    """The model→camera rotation of a face on the optical axis; the inverse of `pose_from_rotation`."""
    p, y, r = (math.radians(v) for v in (-pose.pitch, -pose.yaw, pose.roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_from_rotation(rot: np.ndarray) -> HeadPose:
    """Decompose R = Rz(roll)·Ry(−yaw)·Rx(−pitch) into degrees (valid for |yaw| < 90°)."""
    roll = math.atan2(rot[1, 0], rot[0, 0])
    yaw = -math.asin(max(-1.0, min(1.0, -rot[2, 0])))
    pitch = -math.atan2(rot[2, 1], rot[2, 2])
    return HeadPose(pitch=math.degrees(pitch), yaw=math.degrees(yaw), roll=math.degrees(roll))


def line_of_sight_rotation(direction: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto `direction`."""
    d = np.asarray(direction, dtype=np.float64).reshape(3)
    d = d / np.linalg.norm(d)
    axis = np.cross([0.0, 0.0, 1.0], d)
    sin_a = float(np.linalg.norm(axis))
    if sin_a < 1e-12:
        return np.eye(3)
    angle = math.atan2(sin_a, float(d[2]))
    rot, _ = cv2.Rodrigues(axis / sin_a * angle)
    return rot


def head_pose(landmarks68: np.ndarray, image_size: tuple[int, int], relative_to_line_of_sight: bool = True) -> HeadPose:
    """Pitch, yaw and roll in degrees (see the module docstring for signs) of one face.

    `image_size` is (width, height) of the image the landmarks are in. With
    `relative_to_line_of_sight=False` the angles are in the camera's frame instead (same signs),
    which differs only for faces away from the image centre.
    """
    pts = np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)[list(POSE_LANDMARKS)]
    cam = camera_matrix(image_size)
    # SQPnP finds the global least-squares optimum without an initial guess, so a large yaw
    # cannot fall into the mirrored local minimum the iterative solver may pick from 6 points;
    # an LM step then polishes it.
    ok, rvec, tvec = cv2.solvePnP(MEAN_FACE_MM, pts, cam, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise ValueError("solvePnP failed on these landmarks")
    rvec, tvec = cv2.solvePnPRefineLM(MEAN_FACE_MM, pts, cam, None, rvec, tvec)
    rot, _ = cv2.Rodrigues(rvec)
    if not relative_to_line_of_sight:
        return pose_from_rotation(rot)
    # Remove the rotation of the ray to the face centre, so pose is relative to the line of sight.
    centre = rot @ MEAN_FACE_MM.mean(axis=0) + tvec.reshape(3)
    return pose_from_rotation(line_of_sight_rotation(centre).T @ rot)


@dataclass(frozen=True)
class PoseGate:
    """Reject faces turned too far for a reliable match.

    Defaults are face-pay terminal defaults: the payer stands in front of the terminal and is
    asked to look at it, and recognisers lose accuracy quickly beyond ~25° yaw. Tune per site.
    """

    max_abs_yaw: float = 25.0
    max_abs_pitch: float = 20.0
    max_abs_roll: float = 25.0

    @classmethod
    def of(cls, limits: PoseLimits) -> PoseGate:
        """The gate the settings' `pose` limits describe (the pose stage's, and the offline tools')."""
        return cls(max_abs_yaw=limits.max_abs_yaw, max_abs_pitch=limits.max_abs_pitch, max_abs_roll=limits.max_abs_roll)

    def check(self, pose: HeadPose) -> Reason | None:
        """None when the pose is acceptable, else a stable reason code (yaw checked first)."""
        if abs(pose.yaw) > self.max_abs_yaw:
            return Reason.POSE_YAW
        if abs(pose.pitch) > self.max_abs_pitch:
            return Reason.POSE_PITCH
        if abs(pose.roll) > self.max_abs_roll:
            return Reason.POSE_ROLL
        return None
