"""What the camera client and `facepay demo --enroll/--camera` read: any photo or video OpenCV can
decode, recognised by its content (not its suffix), sent as frames the gateway accepts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facepay.app.camera import UnreadableMedia, frames_from_path, photos_in
from facepay.images import decode_image


def picture(i: int, size=(96, 128)) -> np.ndarray:
    """A BGR frame that differs per index (a gradient and a moving square)."""
    frame = np.tile(np.linspace(0, 255, size[1], dtype=np.uint8), (size[0], 1))[..., None].repeat(3, axis=2)
    cv2.rectangle(frame, (8 + 4 * i, 8), (40 + 4 * i, 40), (0, 0, 255), -1)
    return frame


def write_video(path, fourcc: str, frames: int = 12) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 12, (128, 96))
    assert writer.isOpened(), f"this OpenCV build cannot write {fourcc}"
    for i in range(frames):
        writer.write(picture(i))
    writer.release()


@pytest.mark.parametrize(
    "name, fourcc, renamed",
    [
        ("clip.webm", "VP80", None),
        ("clip.mkv", "FFV1", None),
        ("clip.avi", "MJPG", None),
        ("clip.mp4", "mp4v", "recording"),
    ],
)
def test_a_video_in_any_container_opencv_decodes_becomes_its_frames(tmp_path, name, fourcc, renamed):
    write_video(tmp_path / name, fourcc, frames=12)
    if renamed:  # what it is, not what it is called
        name = (tmp_path / name).rename(tmp_path / renamed).name
    frames = frames_from_path(tmp_path / name)
    assert len(frames) == 12, "every frame, not the file sent as one frame"
    assert all(decode_image(f).shape == (96, 128, 3) for f in frames), "frames the gateway accepts"


def test_every_other_frame_and_a_frame_cap_are_kept(tmp_path):
    write_video(tmp_path / "clip.webm", "VP80", frames=12)
    assert len(frames_from_path(tmp_path / "clip.webm", max_frames=4, every=2)) == 4
    assert len(frames_from_path(tmp_path / "clip.webm", every=3)) == 4


@pytest.mark.parametrize("suffix", [".webp", ".bmp", ".tiff", ".png", ".jpg"])
def test_a_photo_in_any_format_opencv_decodes_is_sent_as_a_frame_the_gateway_accepts(tmp_path, suffix):
    cv2.imwrite(str(tmp_path / f"me{suffix}"), picture(0))
    (frame,) = frames_from_path(tmp_path / f"me{suffix}")
    assert decode_image(frame).shape == (96, 128, 3)


def test_a_photo_too_large_for_the_gateway_is_scaled_down(tmp_path):
    cv2.imwrite(str(tmp_path / "phone.jpg"), cv2.resize(picture(0), (6000, 4500)))
    (frame,) = frames_from_path(tmp_path / "phone.jpg")
    height, width, _ = decode_image(frame).shape
    assert width * height <= 4096 * 4096 and width / height == pytest.approx(6000 / 4500, rel=0.01)


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    from PIL import Image

    upright = cv2.cvtColor(picture(0, size=(96, 128)), cv2.COLOR_BGR2RGB)
    stored = Image.fromarray(np.rot90(upright, k=1))  # as a phone stores a photo taken sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "sideways.jpg", exif=exif)
    (frame,) = frames_from_path(tmp_path / "sideways.jpg")
    assert decode_image(frame).shape == (96, 128, 3)


def test_a_folder_is_its_photos_in_name_order_whatever_their_suffix(tmp_path):
    for i, name in enumerate(["b.webp", "a.png", "c.JPEG"]):
        cv2.imwrite(str(tmp_path / name), picture(i)) if not name.endswith("JPEG") else (tmp_path / name).write_bytes(
            cv2.imencode(".jpg", picture(i))[1].tobytes()
        )
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    assert [p.name for p, _ in photos_in(tmp_path)] == ["a.png", "b.webp", "c.JPEG"]
    assert len(frames_from_path(tmp_path)) == 3


def test_a_file_that_is_neither_a_photo_nor_a_video_is_a_clear_error(tmp_path):
    (tmp_path / "notes.webm").write_text("not a video")
    with pytest.raises(UnreadableMedia, match=r"notes.webm.*neither a photo nor a video"):
        frames_from_path(tmp_path / "notes.webm")


def test_a_stray_file_in_a_folder_of_photos_is_named_in_the_error(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), picture(0))
    (tmp_path / "readme.txt").write_text("my photos")
    with pytest.raises(UnreadableMedia, match=r"readme.txt"):
        frames_from_path(tmp_path)


def test_a_video_in_a_folder_of_photos_is_a_clear_error(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), picture(0))
    write_video(tmp_path / "clip.webm", "VP80", frames=3)
    with pytest.raises(UnreadableMedia, match=r"clip.webm.*video"):
        frames_from_path(tmp_path)


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UnreadableMedia, match=r"nothing.mp4.*does not exist"):
        frames_from_path(tmp_path / "nothing.mp4")
