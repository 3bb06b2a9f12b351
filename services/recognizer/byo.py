"""Bring your own recognizer: an operator's ArcFace-style model, loaded by path.

    load_byo("onnx:/models/w600k_r50.onnx", device="auto")
    load_byo("torchscript:/models/r100.pt", device="cuda")

Both classes give the same interface as `DlibResNetTorchEmbedder` (`model_id`, `dim`, `chip_size`,
`chip_template`, `default_threshold`, `device`, `embed`, `embed_raw`). They read the aligner's
"arcface112" chips: 112×112 RGB, warped onto InsightFace's 5-point template (ARCFACE_112).

Input convention (`InputSpec`). InsightFace's recognition exports take float NCHW RGB,
(pixel − 127.5) / 127.5; these are the defaults. Every part of it can be set: per-channel
mean/std, RGB or BGR order, NCHW or NHWC layout. For ONNX files with no explicit spec, InsightFace's
own rule applies: graphs converted from mxnet begin with their own Sub and Mul (they normalise
inside) and take raw 0..255 pixels, i.e. mean 0, std 1. The spec in use is logged at load.

Embedding size: read from the model: the ONNX graph's output shape (or, when that dimension is
symbolic, one dummy forward pass); for TorchScript, one dummy forward pass.

Backends. ONNX files are converted to torch by onnx2torch (after two exact rewrites that
recent exporters need: opsets above 17 are lowered by onnx's version converter, and a Reshape's
needless `allowzero=1` is dropped), so they run on the same devices as
every other model here (CUDA with fp16 autocast, or the CPU in fp32). At load, the converted
module is checked against onnxruntime on one input (when onnxruntime is installed). If onnx2torch
cannot convert a graph, or its result disagrees with onnxruntime, the model runs in onnxruntime
instead: on the CPU only, and never silently (a WARNING names the reason). On a CUDA device that
is an error instead, because the project never moves a model to the CPU that was asked to run
on the GPU. `backend="onnxruntime"` picks onnxruntime outright (CPU only).

onnx2torch is imported by `facepay.models.onnx_torch.import_onnx2torch`, which copes with a
torchvision that cannot load beside the CPU torch wheel (see there).

Model identity. The gallery keeps one collection per model id, so vectors from two different
files must never share an id: unless given a `name`, the id is `byo-<stem>-<sha256[:12]>`, over
the file's bytes. For ONNX the digest also covers any external-data files the graph references
(torch's exporter writes weights to `model.onnx.data`), so new weights behind an unchanged graph
file still get a new id. An explicit input convention other than the file's default adds a
suffix (same weights, fed differently, give other vectors). A given `name` is used as is; the
operator then answers for it, e.g. to keep one gallery across an ONNX and a TorchScript export
of the same weights.

Threshold. No threshold is known for a foreign model. `default_threshold = 0.5` (cosine) is a
conservative placeholder at the strict end of what InsightFace ArcFace models are run at:
users of InsightFace report cosine ≥ 0.5 as a safe "same person", and its demos use 0.5.
InsightFace's NIST FRVT submission used squared L2 1.2848 between unit vectors, i.e. cosine ≈ 0.36.
Lower thresholds (0.3–0.4) accept more genuine pairs. Strict means fewer false accepts,
more retries. `facepay calibrate` measures and stores the real one for the operator's model and
data.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from facepay.models.base import NormalisedEmbeddings
from facepay.models.device import DeviceUnavailableError, autocast_dtype, resolve_device
from facepay.models.onnx_torch import import_onnx2torch

log = logging.getLogger(__name__)

ARCFACE_CHIP_SIZE = 112
# Cosine placeholder until `facepay calibrate` stores one (see the module docstring).
BYO_DEFAULT_THRESHOLD = 0.5
# The newest opset onnx2torch 1.5 converts throughout; newer graphs are lowered to it first.
ONNX2TORCH_OPSET = 17
# onnx2torch vs onnxruntime on one input, L2-normalised outputs: fp32 conversions agree to ~1e-6.
VERIFY_TOLERANCE = 1e-4

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class ByoModelError(ValueError):
    """The operator's model file cannot be used as a recognizer (the message says why)."""


def _triple(value, what: str) -> tuple[float, float, float]:
    values = np.asarray(value, dtype=np.float64)
    if values.ndim == 0:
        values = np.repeat(values, 3)
    if values.shape != (3,):
        raise ValueError(f"{what} needs one value or three (per channel), got {value!r}")
    first, second, third = (float(v) for v in values)
    return first, second, third


@dataclass(frozen=True)
class InputSpec:
    """How chips become the model's input tensor: x = (pixel − mean) / std, per channel.

    `channels` is the order the model expects ("RGB": the chips as they are; "BGR": reversed);
    `layout` "NCHW" (InsightFace, torch) or "NHWC" (TF-converted graphs). Mean and std are in
    the model's channel order.
    """

    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    channels: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: int = ARCFACE_CHIP_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not be 0, got {self.std}")
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be 'RGB' or 'BGR', got {self.channels!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.size != ARCFACE_CHIP_SIZE:
            raise ValueError(
                f"the aligner makes {ARCFACE_CHIP_SIZE}x{ARCFACE_CHIP_SIZE} ArcFace chips only, got size={self.size}"
            )

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        s = self.size
        return (batch, 3, s, s) if self.layout == "NCHW" else (batch, s, s, 3)

    def describe(self) -> str:
        return f"{self.layout} {self.channels}, (x - {self.mean}) / {self.std}"


# InsightFace's own exports (arcface_torch → ONNX, buffalo_*): (x − 127.5) / 127.5, NCHW RGB.
INSIGHTFACE = InputSpec()
# mxnet-converted InsightFace graphs normalise inside: raw 0..255 RGB in.
RAW_PIXELS = InputSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- identity


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over the files' bytes, in the order given (each prefixed by its length)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def derive_model_id(
    path: Path, sha256: str, name: str | None = None, spec: InputSpec | None = None, automatic: InputSpec | None = None
) -> str:
    """`name` if given (checked to be a plain id), else `byo-<stem>-<sha256[:12]>`.

    When an explicit input convention differs from the one the file would get by default,
    `-in<6 hex>` (a digest of the convention) follows: the same weights fed differently give
    other vectors, which must not share a gallery collection either.
    """
    if name is not None:
        if not _SAFE_ID.match(name):
            raise ValueError(f"model name must be 1-100 characters of [A-Za-z0-9._-], got {name!r}")
        return name
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")[:48] or "model"
    model_id = f"byo-{stem}-{sha256[:12]}"
    if spec is not None and automatic is not None and spec != automatic:
        model_id += "-in" + hashlib.sha256(repr(spec).encode()).hexdigest()[:6]
    return model_id


def _existing_file(path: str | Path, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"{kind} recognizer model {str(p)!r} {what}")
    return p.resolve()


# ---------------------------------------------------------------- shared embedder


class _ByoEmbedder(NormalisedEmbeddings):
    """Batching, chip checks, normalisation and autocast shared by both formats."""

    chip_size = ARCFACE_CHIP_SIZE
    chip_template = "arcface112"
    default_threshold = BYO_DEFAULT_THRESHOLD

    model_id: str
    dim: int
    backend: str  # "onnx2torch", "onnxruntime" or "torchscript"

    def __init__(self, path: Path, device: str | torch.device, max_batch: int) -> None:
        self._device = resolve_device(str(device))
        self.compute_dtype = autocast_dtype(self._device)
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.path = path
        self.input_spec: InputSpec = INSIGHTFACE

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim}, backend={self.backend!r}, "
            f"device={str(self._device)!r}, input={self.input_spec.describe()!r})"
        )

    def embed_raw(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, dim) float32 outputs exactly as the model gives them (not normalised)."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        size = self.chip_size
        for chip in chips:
            if getattr(chip, "shape", None) != (size, size, 3) or chip.dtype != np.uint8:
                raise ValueError(
                    f"expected {size}x{size}x3 uint8 RGB chips (the aligner's 'arcface112'), "
                    f"got {getattr(chip, 'dtype', type(chip))} {getattr(chip, 'shape', '')}"
                )
        out = [
            self._forward_chips(np.stack(chips[i : i + self.max_batch])) for i in range(0, len(chips), self.max_batch)
        ]
        return np.concatenate(out)

    def _to_input(self, batch: np.ndarray, device: torch.device) -> torch.Tensor:
        """(N, H, W, 3) uint8 RGB → the model's float32 input per `input_spec`."""
        spec = self.input_spec
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).float()
        if spec.channels == "BGR":
            x = x.flip(-1)
        mean = torch.tensor(spec.mean, device=device)
        std = torch.tensor(spec.std, device=device)
        x = (x - mean) / std
        return x.permute(0, 3, 1, 2).contiguous() if spec.layout == "NCHW" else x.contiguous()

    def _forward_chips(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _TorchModuleEmbedder(_ByoEmbedder):
    """A torch module (converted ONNX or TorchScript) on `device`, fp16 autocast on CUDA."""

    _module: torch.nn.Module

    def _run_module(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx = torch.autocast(self._device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with torch.inference_mode(), ctx:
            y = self._module(x)
        return _single_output(y, self.path)

    def _forward_chips(self, batch: np.ndarray) -> np.ndarray:
        y = self._run_module(self._to_input(batch, self._device), self.compute_dtype)
        return y.float().cpu().numpy()

    def _probe(self, batch: int) -> torch.Tensor:
        """One forward pass in fp32 on mid-grey chips of `batch` (for shapes and checks)."""
        chips = np.full((batch, self.chip_size, self.chip_size, 3), 128, dtype=np.uint8)
        return self._run_module(self._to_input(chips, self._device), torch.float32)


def _single_output(y, path: Path) -> torch.Tensor:
    if isinstance(y, (tuple, list)) and len(y) == 1:
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise ByoModelError(f"{path}: the model returns {type(y).__name__}; a recognizer returns one (N, dim) tensor")
    if y.ndim != 2:
        raise ByoModelError(f"{path}: the model returns shape {tuple(y.shape)}; a recognizer returns (N, dim)")
    return y


# ---------------------------------------------------------------- TorchScript


class TorchScriptEmbedder(_TorchModuleEmbedder):
    """A TorchScript recognizer (`torch.jit.save` of a traced or scripted module).

    The file must map a float (N, 3, 112, 112) batch (or whatever `input_spec` describes) to
    (N, dim) embeddings. The size is taken from one dummy forward pass. A module traced with the
    batch size baked in (it fails or misbehaves on a batch of 2) is run one chip at a time,
    and that is logged.
    """

    backend = "torchscript"

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "auto",
        name: str | None = None,
        input_spec: InputSpec | None = None,
        max_batch: int = 64,
    ) -> None:
        path = _existing_file(path, "TorchScript")
        super().__init__(path, device, max_batch)
        self.input_spec = input_spec or INSIGHTFACE
        self.sha256 = file_digest([path])
        self.model_id = derive_model_id(path, self.sha256, name, self.input_spec, INSIGHTFACE)
        try:
            module = torch.jit.load(str(path), map_location=self._device)
        except Exception as exc:  # torch raises RuntimeError / ValueError with its own text
            raise ByoModelError(
                f"{path} is not a TorchScript archive torch {torch.__version__} can load: {exc}"
            ) from exc
        self._module = module.eval()
        try:
            one = self._probe(1)
        except ByoModelError:
            raise
        except Exception as exc:
            raise ByoModelError(
                f"{path}: a {self.input_spec.shape(1)} float input fails ({self.input_spec.describe()}): {exc}"
            ) from exc
        if one.shape[0] != 1:
            raise ByoModelError(f"{path}: one chip in gave {tuple(one.shape)} out; expected (1, dim)")
        self.dim = int(one.shape[1])
        if self.max_batch > 1 and not self._batches():
            log.info("%s: the module does not take batches (batch size baked in); running one chip at a time", path)
            self.max_batch = 1
        log.info("loaded %r", self)

    def _batches(self) -> bool:
        try:
            two = self._probe(2)
        except Exception:  # noqa: BLE001 - any failure of the probe means: one face per call
            return False
        return tuple(two.shape) == (2, self.dim)


# ---------------------------------------------------------------- ONNX


class OnnxEmbedder(_TorchModuleEmbedder):
    """An ONNX recognizer (e.g. an InsightFace ArcFace export), run by torch via onnx2torch.

    backend: "auto" (onnx2torch, checked against onnxruntime; onnxruntime on the CPU if the
    conversion fails, with a WARNING), "onnx2torch" (no fallback) or "onnxruntime" (CPU only).
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "auto",
        name: str | None = None,
        input_spec: InputSpec | None = None,
        max_batch: int = 64,
        backend: Literal["auto", "onnx2torch", "onnxruntime"] = "auto",
        verify: bool = True,
    ) -> None:
        if backend not in ("auto", "onnx2torch", "onnxruntime"):
            raise ValueError(f"backend must be 'auto', 'onnx2torch' or 'onnxruntime', got {backend!r}")
        path = _existing_file(path, "ONNX")
        super().__init__(path, device, max_batch)
        onnx = _import("onnx", "ONNX recognizers")
        try:
            # Without the external data first: loading it clears where it came from.
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ByoModelError(f"{path} is not an ONNX model onnx {onnx.__version__} can read: {exc}") from exc
        data_files = _external_data_files(model, path)
        missing = [str(p) for p in data_files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: the weights it points at are missing: {', '.join(missing)}")
        importlib.import_module("onnx.external_data_helper").load_external_data_for_model(model, str(path.parent))
        self.sha256 = file_digest([path, *data_files])

        graph = _GraphInfo.of(model, path)
        automatic = RAW_PIXELS if graph.normalises_input else INSIGHTFACE
        self.input_spec = input_spec or automatic
        self.model_id = derive_model_id(path, self.sha256, name, self.input_spec, automatic)
        graph.check_input(self.input_spec)
        if graph.batch is not None:
            if graph.batch != 1:
                raise ByoModelError(
                    f"{path}: the graph's batch size is fixed at {graph.batch}; export it with 1 or dynamic"
                )
            if self.max_batch > 1:
                log.info("%s: the graph's batch size is fixed at 1; running one chip at a time", path)
            self.max_batch = 1
        self._input_name = graph.input_name

        self._session = None
        if backend == "onnxruntime":
            self._use_onnxruntime(reason="backend='onnxruntime' was asked for")
        else:
            try:
                self._use_onnx2torch(model, verify)
            except _ConversionFailed as exc:
                if backend == "onnx2torch" or self._device.type != "cpu":
                    where = "backend='onnx2torch'" if backend == "onnx2torch" else f"device {str(self._device)!r}"
                    raise ByoModelError(
                        f"{path}: onnx2torch cannot run this graph ({exc}); onnxruntime is the CPU-only "
                        f"fallback and {where} rules it out (use device='cpu' to allow it)"
                    ) from exc
                self._use_onnxruntime(reason=f"onnx2torch cannot run it: {exc}")
        del model

        self.dim = graph.dim if graph.dim is not None else self._dummy_dim()
        log.info("loaded %r", self)

    # ---- backends
    def _use_onnx2torch(self, model, verify: bool) -> None:
        self.backend = "onnx2torch"
        try:
            convert = import_onnx2torch().convert
            module = convert(_without_needless_allowzero(_opset_for_onnx2torch(model)))
        except ImportError:
            raise
        except Exception as exc:
            raise _ConversionFailed(f"{type(exc).__name__}: {exc}") from exc
        self._module = module.eval().requires_grad_(False).to(self._device)
        try:
            probe = self._probe(1)
        except Exception as exc:
            raise _ConversionFailed(
                f"the converted module fails on a 1-chip batch: {type(exc).__name__}: {exc}"
            ) from exc
        if verify:
            self._verify_against_onnxruntime(probe)

    def _verify_against_onnxruntime(self, probe: torch.Tensor) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            log.info("%s: onnxruntime not installed; the onnx2torch conversion is not cross-checked", self.path)
            return
        rng = np.random.default_rng(0)
        chips = rng.integers(0, 256, (1, self.chip_size, self.chip_size, 3), dtype=np.uint8)
        x = self._to_input(chips, torch.device("cpu"))
        expected = _ort_session(self.path).run(None, {self._input_name: x.numpy()})[0]
        got = self._run_module(x.to(self._device), torch.float32).float().cpu().numpy()
        if got.shape != expected.shape:
            raise _ConversionFailed(f"output shape {got.shape} vs onnxruntime's {expected.shape}")
        diff = float(np.abs(_unit(got) - _unit(expected)).max())
        if not diff <= VERIFY_TOLERANCE:
            raise _ConversionFailed(
                f"its output differs from onnxruntime's by {diff:.2e} (tolerance {VERIFY_TOLERANCE:.0e})"
            )
        log.debug("%s: onnx2torch matches onnxruntime to %.2e", self.path, diff)

    def _use_onnxruntime(self, reason: str) -> None:
        if self._device.type != "cpu":
            raise DeviceUnavailableError(
                f"{self.path}: onnxruntime runs here on the CPU only, but device {str(self._device)!r} was asked for"
            )
        log.warning("%s: running with onnxruntime on the CPU, not torch (%s)", self.path, reason)
        self.backend = "onnxruntime"
        self._module = None  # type: ignore[assignment]
        self._session = _ort_session(self.path)

    # ---- inference
    def _forward_chips(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            return super()._forward_chips(batch)
        x = self._to_input(batch, torch.device("cpu")).numpy()
        y = self._session.run(None, {self._input_name: x})[0]
        return _single_output(torch.from_numpy(np.asarray(y)), self.path).float().numpy()

    def _dummy_dim(self) -> int:
        chips = np.full((1, self.chip_size, self.chip_size, 3), 128, dtype=np.uint8)
        return int(self._forward_chips(chips).shape[1])


class _ConversionFailed(Exception):
    pass


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class _GraphInfo:
    """What the ONNX graph says about its one input and one output."""

    path: Path
    input_name: str
    input_dims: tuple[int | str | None, ...]  # int when static, else the symbol (or None)
    batch: int | None  # static batch size, None when dynamic
    dim: int | None  # static embedding size, None when symbolic
    normalises_input: bool

    @classmethod
    def of(cls, model, path: Path) -> _GraphInfo:
        g = model.graph
        initializers = {t.name for t in g.initializer}
        # Older IRs also list the weights among the graph inputs.
        inputs = [i for i in g.input if i.name not in initializers]
        if len(inputs) != 1 or len(g.output) != 1:
            raise ByoModelError(
                f"{path}: a recognizer graph has one input and one output; this one has inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in g.output]}"
            )
        inp, out = inputs[0], g.output[0]
        if inp.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
            raise ByoModelError(f"{path}: the input must be float32 (export the model in float32)")
        in_dims, out_dims = _dims(inp), _dims(out)
        if len(in_dims) != 4:
            raise ByoModelError(f"{path}: the input has shape {in_dims}; expected 4 dimensions (N, 3, 112, 112)")
        if out_dims and len(out_dims) != 2:
            raise ByoModelError(f"{path}: the output has shape {out_dims}; a recognizer gives (N, dim)")
        batch = in_dims[0] if isinstance(in_dims[0], int) else None
        dim = out_dims[1] if len(out_dims) == 2 and isinstance(out_dims[1], int) else None
        return cls(path, inp.name, in_dims, batch, dim, _normalises_input(g, inp.name))

    def check_input(self, spec: InputSpec) -> None:
        expected = spec.shape(1)[1:]
        got = self.input_dims[1:]
        if all(isinstance(d, int) for d in got) and tuple(got) != expected:
            hint = ""
            other = replace(spec, layout="NHWC" if spec.layout == "NCHW" else "NCHW")
            if tuple(got) == other.shape(1)[1:]:
                hint = f"; it looks like {other.layout}: pass InputSpec(layout={other.layout!r})"
            raise ByoModelError(
                f"{self.path}: the graph takes {self.input_dims}, not (N, {', '.join(map(str, expected))}) "
                f"for 112x112 ArcFace chips in {spec.layout}{hint}"
            )


def _dims(value_info) -> tuple[int | str | None, ...]:
    if not value_info.type.tensor_type.HasField("shape"):
        return ()
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(out)


def _normalises_input(graph, input_name: str, depth: int = 8) -> bool:
    """InsightFace's rule, made exact: follow the input through its first few nodes, up to
    the first convolution or matrix product. A Sub and then a Mul or Div on that path means
    the graph normalises its input itself (mxnet-converted exports), so it takes raw pixels."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, tensor = [], input_name
    for _ in range(depth):
        nodes = consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type in ("Conv", "MatMul", "Gemm"):
            break
        seen.append(nodes[0].op_type)
        tensor = nodes[0].output[0]
    return "Sub" in seen and any(op in ("Mul", "Div") for op in seen[seen.index("Sub") :])


def _opset_for_onnx2torch(model):
    """The model at opset ONNX2TORCH_OPSET when it declares a newer one, else unchanged.

    onnx2torch 1.5 has converters up to about opset 17; what later opsets changed in the ops
    recognition graphs use (Constant-19, Reshape-19/21, Cast-19, …) is new data types. onnx's
    own version converter rewrites the graph for the older opset; where it cannot, the original
    goes to onnx2torch (and the onnxruntime fallback if that fails too).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset <= ONNX2TORCH_OPSET:
        return model
    try:
        lowered = importlib.import_module("onnx.version_converter").convert_version(model, ONNX2TORCH_OPSET)
    except Exception as exc:  # noqa: BLE001 - onnx's converter raises anything; converting as is is the fallback
        log.info(
            "opset %d could not be lowered to %d for onnx2torch (%s); converting as is", opset, ONNX2TORCH_OPSET, exc
        )
        return model
    log.info("opset %d lowered to %d for onnx2torch", opset, ONNX2TORCH_OPSET)
    return lowered


def _without_needless_allowzero(model):
    """The model with `allowzero=1` dropped from Reshapes whose target shape is a constant with
    no 0 in it, where the attribute changes nothing. torch's ONNX exporter writes allowzero=1
    on every Reshape (e.g. the flatten before the embedding layer), and onnx2torch 1.5 refuses
    any Reshape carrying it. Changes the model in place and returns it."""
    numpy_helper = importlib.import_module("onnx.numpy_helper")
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    constants[node.output[0]] = attr.t
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        for attr in node.attribute:
            if (
                attr.name == "allowzero"
                and attr.i == 1
                and not (numpy_helper.to_array(constants[node.input[1]]) == 0).any()
            ):
                attr.i = 0
    return model


def _external_data_files(model, path: Path) -> list[Path]:
    """The external-data files the graph's tensors point at (their bytes are the weights)."""
    locations = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [(path.parent / loc).resolve() for loc in sorted(locations)]


def _ort_session(path: Path):
    ort = _import("onnxruntime", "the onnxruntime backend")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as torch here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _import(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} need the {module!r} package: pip install {module}") from exc


# ---------------------------------------------------------------- spec


BYO_FORMATS = {"onnx": OnnxEmbedder, "torchscript": TorchScriptEmbedder}


def load_byo(spec: str, device: str | torch.device = "auto"):
    """An operator's recognizer from `onnx:/path/model.onnx` or `torchscript:/path/model.pt`.

    Defaults throughout: InsightFace's input convention, model id from the file (see the module
    docstring). Construct `OnnxEmbedder` / `TorchScriptEmbedder` directly for other settings.
    """
    kind, sep, path = str(spec).partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in BYO_FORMATS:
        raise ValueError(
            f"bring-your-own recognizer spec {spec!r}: expected 'onnx:/path/model.onnx' or 'torchscript:/path/model.pt'"
        )
    if not path.strip():
        raise ValueError(f"bring-your-own recognizer spec {spec!r} names no file")
    return BYO_FORMATS[kind](path.strip(), device=device)


def is_byo_spec(name: str) -> bool:
    """Whether a recognizer model name is a BYO spec (for `load_embedder`'s dispatch)."""
    kind, sep, _ = str(name).partition(":")
    return bool(sep) and kind.strip().lower() in BYO_FORMATS
