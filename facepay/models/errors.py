"""Errors of model plumbing that a process reports without loading torch."""


class DeviceUnavailableError(RuntimeError):
    """A device was asked for (FACEPAY_DEVICE) that this machine or model cannot run on."""
