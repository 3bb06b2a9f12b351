"""A camera client: plays a folder of photos or a video file into the gateway as timed frames."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import grpc

from facepay.contract import pb, rpc
from facepay.grpc_tls import ClientTLS, client_channel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # what `facepay enroll --images` picks from a folder

# What the gateway accepts (facepay.images.decode_image): anything else is re-encoded here.
GATEWAY_FORMATS = ("JPEG", "PNG")
MAX_FRAME_PIXELS = 4096 * 4096
MAX_FRAME_BYTES = 8 << 20
PHOTO_LONG_SIDE = 2048  # an over-sized photo is scaled to this: far more than a face needs
# Statuses that mean "not stored, try again later": the gateway's queue is down, read-only
# after a failover, full, or this camera is over its rate.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
RETRYABLE_CODES = {code.value[0] for code in RETRYABLE}


class UnreadableMedia(ValueError):
    """A file given as photos or video that cannot be read; the message names it and says why."""


def frames_from_path(path: str | Path, max_frames: int | None = None, every: int = 1) -> list[bytes]:
    """Encoded frames: each photo of a folder (by name), one photo, or every `every`-th video frame.

    Photos and videos are told apart by their content, not their suffix: anything OpenCV decodes
    is read (a .webm, a .heic saved as .jpg, a clip without a suffix).
    """
    path = Path(path)
    if path.is_dir():
        return [photo for _, photo in photos_in(path)][:max_frames]
    if not path.is_file():
        raise UnreadableMedia(f"{path} does not exist")
    photo = read_photo(path)
    if photo is not None:
        return [photo]
    return list(video_frames(path, max_frames, every))


def photos_in(folder: str | Path) -> list[tuple[Path, bytes]]:
    """Every photo of a folder, by file name; hidden files are skipped, anything else is an error."""
    photos = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        photo = read_photo(path)
        if photo is None:
            what = "a video" if _is_video(path) else "neither a photo nor a video OpenCV can decode"
            raise UnreadableMedia(
                f"{path} in a folder of photos is {what}; a folder holds photos (give a video as its own path)"
            )
        photos.append((path, photo))
    return photos


def read_photo(path: Path) -> bytes | None:
    """The photo as bytes the gateway accepts, or None when the file is not a photo.

    JPEG/PNG files that the gateway accepts as they are go as they are; other formats,
    over-sized photos and photos stored sideways (EXIF orientation, as phones do) are decoded
    upright by OpenCV and sent as JPEG.
    """
    if not cv2.haveImageReader(str(path)):  # by the file's signature, not its name
        return None
    if _acceptable_as_is(path):
        return path.read_bytes()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # applies the EXIF orientation
    if image is None:
        return None
    scale = PHOTO_LONG_SIDE / max(image.shape[:2])
    if scale < 1 and (image.shape[0] * image.shape[1] > MAX_FRAME_PIXELS or path.stat().st_size > MAX_FRAME_BYTES):
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def _acceptable_as_is(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            upright = image.getexif().get(0x0112, 1) == 1
            fits = image.width * image.height <= MAX_FRAME_PIXELS and path.stat().st_size <= MAX_FRAME_BYTES
            return image.format in GATEWAY_FORMATS and upright and fits
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return False


def _is_video(path: Path) -> bool:
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.isOpened() and capture.read()[0]
    finally:
        capture.release()


def video_frames(path: Path, max_frames: int | None = None, every: int = 1, start: int = 0) -> Iterator[bytes]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise UnreadableMedia(f"cannot read {path}: neither a photo nor a video OpenCV can decode")
    index = produced = 0
    try:
        while max_frames is None or produced < max_frames:
            ok, frame = capture.read()
            if not ok:
                if index == 0:
                    raise UnreadableMedia(f"cannot read {path}: OpenCV opened it as a video but decoded no frame")
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

    def stream_session(
        self, session_id: str, frames: Iterable[bytes], fps: float = 0.0, phone_suffix: str = ""
    ) -> list[pb.FrameAck]:
        """Send a session's frames then its end marker on one stream; returns every ack."""
        frames = list(frames)

        def messages() -> Iterator[pb.CameraMessage]:
            for seq, image in enumerate(frames):
                yield pb.CameraMessage(
                    frame=pb.Frame(
                        camera_id=self.camera_id,
                        store_id=self.store_id,
                        session_id=session_id,
                        capture_time_ms=int(time.time() * 1000),
                        sequence=seq,
                        image=image,
                        phone_suffix=phone_suffix,
                    )
                )
                if fps:
                    time.sleep(1.0 / fps)
            yield pb.CameraMessage(
                end=pb.SessionEnd(
                    camera_id=self.camera_id, store_id=self.store_id, session_id=session_id, frame_count=len(frames)
                )
            )

        acks: dict[int, pb.FrameAck] = {}
        try:
            for ack in self.stub.StreamFrames(messages(), metadata=self.metadata):
                acks[ack.sequence] = ack
        except grpc.RpcError as err:  # the stream itself refused or cut: resend what has no ack
            if err.code() not in RETRYABLE:
                raise
        unacked = grpc.StatusCode.UNAVAILABLE.value[0]
        return [
            self._retry(
                acks.get(seq) or pb.FrameAck(session_id=session_id, sequence=seq, code=unacked),
                frames,
                session_id,
                phone_suffix,
            )
            for seq in [*range(len(frames)), -1]
        ]

    def _retry(
        self, ack: pb.FrameAck, frames: list[bytes], session_id: str, phone_suffix: str, give_up_after_s: float = 60.0
    ) -> pb.FrameAck:
        """A frame refused as UNAVAILABLE (queue down, failover) or RESOURCE_EXHAUSTED (over the
        camera's rate, queue full) was not stored: send it again, backing off."""
        delay, deadline = 0.25, time.monotonic() + give_up_after_s
        while ack.code in RETRYABLE_CODES and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                if ack.sequence < 0:
                    ack = self.stub.EndSession(
                        pb.SessionEnd(
                            camera_id=self.camera_id,
                            store_id=self.store_id,
                            session_id=session_id,
                            frame_count=len(frames),
                        ),
                        metadata=self.metadata,
                        timeout=30,
                    )
                else:
                    ack = self.stub.SubmitFrame(
                        pb.Frame(
                            camera_id=self.camera_id,
                            store_id=self.store_id,
                            session_id=session_id,
                            capture_time_ms=int(time.time() * 1000),
                            sequence=ack.sequence,
                            image=frames[ack.sequence],
                            phone_suffix=phone_suffix,
                        ),
                        metadata=self.metadata,
                        timeout=30,
                    )
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                ack = pb.FrameAck(
                    session_id=session_id, sequence=ack.sequence, code=err.code().value[0], message=err.details()
                )
        return ack

    def close(self) -> None:
        self.channel.close()
