"""Decoding camera images safely: corrupt bytes, absurd sizes and odd formats get a clear error."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

ALLOWED_FORMATS = ("JPEG", "PNG")


class ImageError(ValueError):
    """The bytes are not an image facepay accepts; the message says why."""


def decode_image(
    data: bytes, max_bytes: int = 8 << 20, max_pixels: int = 4096 * 4096, declared: tuple[int, int] | None = None
) -> np.ndarray:
    """JPEG/PNG bytes → RGB uint8 array, checked before the pixels are decoded."""
    if not data:
        raise ImageError("empty image")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt, (width, height) = image.format, image.size
            if fmt not in ALLOWED_FORMATS:
                raise ImageError(f"image format {fmt} is not accepted (JPEG or PNG)")
            if width * height > max_pixels or width < 16 or height < 16:
                raise ImageError(f"image size {width}x{height} is outside 16x16 … {max_pixels} pixels")
            if declared and any(declared) and declared != (width, height):
                raise ImageError(f"declared size {declared[0]}x{declared[1]} but the image is {width}x{height}")
            return np.asarray(image.convert("RGB"))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image size is outside 16x16 … {max_pixels} pixels: {exc}") from exc
    except Exception as exc:  # PIL raises many types for broken data: one answer for all
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("could not encode JPEG")
    return buf.tobytes()


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError("could not encode PNG")
    return buf.tobytes()


def decode_trusted(data: bytes) -> np.ndarray:
    """Decode an image a facepay stage encoded itself (crops, chips)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError("internal image could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
