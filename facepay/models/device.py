"""Device choice for every model: CUDA when asked or available, never a silent CPU fallback."""

from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    pass


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
