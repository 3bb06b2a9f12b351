"""A camera client: plays a folder of photos or a video file into the gateway as timed frames."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import grpc

from facepay.contract import pb, rpc
from facepay.grpc_tls import ClientTLS, client_channel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv"}
# Statuses that mean "not stored, try again later": the gateway's queue is down, read-only
# after a failover, full, or this camera is over its rate.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
RETRYABLE_CODES = {code.value[0] for code in RETRYABLE}


def frames_from_path(path: str | Path, max_frames: int | None = None, every: int = 1) -> list[bytes]:
    """Encoded frames: each photo of a folder (sorted), one photo, or every `every`-th video frame."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [p.read_bytes() for p in files][:max_frames]
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return list(video_frames(path, max_frames, every))
    return [path.read_bytes()]


def video_frames(path: Path, max_frames: int | None = None, every: int = 1, start: int = 0) -> Iterator[bytes]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open video {path}")
    index = produced = 0
    try:
        while max_frames is None or produced < max_frames:
            ok, frame = capture.read()
            if not ok:
                return
            if index >= start and (index - start) % every == 0:
                yield cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
                produced += 1
            index += 1
    finally:
        capture.release()


class CameraClient:
    def __init__(self, address: str, camera_id: str, token: str, store_id: str, tls: ClientTLS | None = None) -> None:
        self.channel = client_channel(address, tls)
        self.stub = rpc.FaceGatewayStub(self.channel)
        self.camera_id, self.store_id = camera_id, store_id
        self.metadata = (("x-camera-id", camera_id), ("authorization", f"Bearer {token}"))

    def stream_session(self, session_id: str, frames: Iterable[bytes], fps: float = 0.0,
                       phone_suffix: str = "") -> list[pb.FrameAck]:
        """Send a session's frames then its end marker on one stream; returns every ack."""
        frames = list(frames)

        def messages() -> Iterator[pb.CameraMessage]:
            for seq, image in enumerate(frames):
                yield pb.CameraMessage(frame=pb.Frame(
                    camera_id=self.camera_id, store_id=self.store_id, session_id=session_id,
                    capture_time_ms=int(time.time() * 1000), sequence=seq, image=image, phone_suffix=phone_suffix))
                if fps:
                    time.sleep(1.0 / fps)
            yield pb.CameraMessage(end=pb.SessionEnd(camera_id=self.camera_id, store_id=self.store_id,
                                                     session_id=session_id, frame_count=len(frames)))

        acks: dict[int, pb.FrameAck] = {}
        try:
            for ack in self.stub.StreamFrames(messages(), metadata=self.metadata):
                acks[ack.sequence] = ack
        except grpc.RpcError as err:  # the stream itself refused or cut: resend what has no ack
            if err.code() not in RETRYABLE:
                raise
        unacked = grpc.StatusCode.UNAVAILABLE.value[0]
        return [self._retry(acks.get(seq) or pb.FrameAck(session_id=session_id, sequence=seq, code=unacked),
                            frames, session_id, phone_suffix)
                for seq in [*range(len(frames)), -1]]

    def _retry(self, ack: pb.FrameAck, frames: list[bytes], session_id: str, phone_suffix: str,
               give_up_after_s: float = 60.0) -> pb.FrameAck:
        """A frame refused as UNAVAILABLE (queue down, failover) or RESOURCE_EXHAUSTED (over the
        camera's rate, queue full) was not stored: send it again, backing off."""
        delay, deadline = 0.25, time.monotonic() + give_up_after_s
        while ack.code in RETRYABLE_CODES and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                if ack.sequence < 0:
                    ack = self.stub.EndSession(pb.SessionEnd(camera_id=self.camera_id, store_id=self.store_id,
                                                             session_id=session_id, frame_count=len(frames)),
                                               metadata=self.metadata, timeout=30)
                else:
                    ack = self.stub.SubmitFrame(pb.Frame(
                        camera_id=self.camera_id, store_id=self.store_id, session_id=session_id,
                        capture_time_ms=int(time.time() * 1000), sequence=ack.sequence,
                        image=frames[ack.sequence], phone_suffix=phone_suffix), metadata=self.metadata, timeout=30)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                ack = pb.FrameAck(session_id=session_id, sequence=ack.sequence, code=err.code().value[0], message=err.details())
        return ack

    def close(self) -> None:
        self.channel.close()
