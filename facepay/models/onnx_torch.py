"""onnx2torch, importable beside the CPU torch wheel: for every ONNX model run in torch (the
recognizer's bring-your-own models, the detector's SCRFD).

onnx2torch imports torchvision when it loads, but only uses it for the NonMaxSuppression
and RoiAlign converters, which recognition graphs do not have. PyPI's torchvision wheels are built
against PyPI's CUDA torch and do not import with the CPU torch wheel this project pins. So when
torchvision is missing or fails to import, onnx2torch is imported against a stand-in whose two
functions raise. The stand-in is removed from `sys.modules` right after the import, so nothing
else ever sees it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types

log = logging.getLogger(__name__)


def _torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except Exception as exc:  # noqa: BLE001 - the CUDA wheel against CPU torch raises RuntimeError
        log.debug("torchvision does not import (%s); onnx2torch gets a stand-in", exc)
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        return False


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    def missing(*_args, **_kwargs):
        raise NotImplementedError(
            "this ONNX graph uses NonMaxSuppression or RoiAlign, which onnx2torch runs with torchvision, "
            "and torchvision cannot be imported here"
        )

    root, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = missing  # type: ignore[attr-defined]
    root.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": root, "torchvision.ops": ops}


def import_onnx2torch():
    """onnx2torch, imported against torchvision or, when that cannot load, the stand-in."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    if importlib.util.find_spec("onnx2torch") is None:
        raise ImportError("ONNX models run in torch need the 'onnx2torch' package: pip install onnx2torch")
    if _torchvision_importable():
        return importlib.import_module("onnx2torch")
    log.info(
        "torchvision cannot be imported; onnx2torch is loaded without it (NonMaxSuppression and RoiAlign unsupported)"
    )
    stand_in = _torchvision_stand_in()
    sys.modules.update(stand_in)
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for key, module in stand_in.items():
            if sys.modules.get(key) is module:
                del sys.modules[key]
