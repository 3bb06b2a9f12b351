"""Device choice for every model: CUDA when asked or available, never a silent CPU fallback."""

from __future__ import annotations

import torch

from facepay.models.errors import DeviceUnavailableError

__all__ = ["DeviceUnavailableError", "autocast_dtype", "dlib_cpu_device", "resolve_device"]


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' → cuda if present else cpu; 'cuda[:N]' without CUDA raises instead of using the CPU."""
    requested = requested.strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {requested!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda}); "
                "set FACEPAY_DEVICE=cpu to run on the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"{requested!r}: only {torch.cuda.device_count()} CUDA devices")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (tensor cores, half the memory), fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def dlib_cpu_device(requested: str | torch.device = "cpu") -> torch.device:
    """The device a dlib model runs on: always the CPU.

    The dlib-bin wheel is built without CUDA (and the shape predictor never uses a GPU), so a
    CUDA request fails loudly instead of silently running on the CPU; "auto" means "best
    available", which for dlib is the CPU.
    """
    name = str(requested).strip().lower()
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    import dlib  # for the message only: the platform does not load dlib for everyone

    raise DeviceUnavailableError(
        f"device {name!r} was asked for, but dlib models run on the CPU only "
        f"(dlib {dlib.__version__}, DLIB_USE_CUDA={dlib.DLIB_USE_CUDA}); use device='cpu'"
    )
