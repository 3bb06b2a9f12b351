"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) ported to torch.

The network is built straight from dlib's own `.dat` file, so it uses the very weights of
`DlibResNetEmbedder` and gives the same 128-d vectors (to float rounding), but batches, and runs
on CUDA in fp16 when there is one.

dlib's serialization (dlib/serialize.h, dlib/dnn/*.h), as met in this file:

- integer: one byte whose low 4 bits are the byte count and whose bit 7 is the sign, then that
  many little-endian magnitude bytes;
- float/double: two integers, a mantissa m and an exponent e (value m·2^e);
- string: an integer length, then the raw bytes;  bool: one ASCII byte, '0' or '1';
- tensor: version integer 2, four integer dims (num_samples, k, nr, nc), then the values as
  raw little-endian float32 (not mantissa/exponent);
- alias_tensor (a view into a layer's params): version integer 1 and four dims, no data.

A network is nested: the outermost object (the loss) is written first, and each `add_layer`
writes its version, then its whole sub-network, then its own record. So the file opens with the
loss record and a run of version integers (one per wrapper, outermost first: 2 for a layer, 1 for
a tag or skip, which write nothing else), then the input layer, then the layer records from the
input upwards. A tag/skip writes no id, and `add_prev_` does not write which tag it reads: where
the residual connections go is in the C++ type only (dnn_face_recognition_ex.cpp), so
`DlibResNetTorch` recognises that network's units in the flat record list and checks them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facepay.models.base import NormalisedEmbeddings, check_chips
from facepay.models.cache import weight_path
from facepay.models.device import autocast_dtype, resolve_device

WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"


class DlibFormatError(ValueError):
    """The file is not a dlib network this reader understands."""


# ---------------------------------------------------------------- dlib's serialization


def read_int(f: BinaryIO) -> int:
    head = f.read(1)
    if not head:
        raise DlibFormatError("unexpected end of file reading an integer")
    size, negative = head[0] & 0x0F, head[0] & 0x80
    if size > 8:
        raise DlibFormatError(f"bad integer header byte 0x{head[0]:02x} at offset {f.tell() - 1}")
    value = int.from_bytes(_read_exact(f, size), "little")
    return -value if negative else value


def read_float(f: BinaryIO) -> float:
    """A float or double: mantissa and exponent integers (dlib's float_details)."""
    mantissa, exponent = read_int(f), read_int(f)
    specials = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
    if exponent in specials:
        return specials[exponent]
    return float(mantissa) * 2.0**exponent


def read_string(f: BinaryIO) -> str:
    return _read_exact(f, read_int(f)).decode("latin-1")


def read_bool(f: BinaryIO) -> bool:
    byte = _read_exact(f, 1)
    if byte not in (b"0", b"1"):
        raise DlibFormatError(f"bad bool byte {byte!r} at offset {f.tell() - 1}")
    return byte == b"1"


def read_tensor(f: BinaryIO) -> np.ndarray:
    """A dlib tensor as a float32 array of shape (num_samples, k, nr, nc)."""
    version = read_int(f)
    if version != 2:
        raise DlibFormatError(f"tensor version {version} at offset {f.tell()}; expected 2")
    shape = tuple(read_int(f) for _ in range(4))
    count = int(np.prod(shape))
    return np.frombuffer(_read_exact(f, 4 * count), dtype="<f4").astype(np.float32).reshape(shape)


def read_alias(f: BinaryIO) -> tuple[int, int, int, int]:
    """An alias_tensor: only the shape of a view into a layer's params tensor."""
    version = read_int(f)
    if version != 1:
        raise DlibFormatError(f"alias_tensor version {version} at offset {f.tell()}; expected 1")
    return tuple(read_int(f) for _ in range(4))  # type: ignore[return-value]


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DlibFormatError(f"unexpected end of file: wanted {n} bytes, got {len(data)}")
    return data


def _peek_string(f: BinaryIO) -> str | None:
    """The string at the current offset if one plausibly starts there; the offset is kept."""
    start = f.tell()
    try:
        n = read_int(f)
        raw = f.read(n) if 0 < n < 64 else b""
        text = raw.decode("ascii") if len(raw) == n and raw.isascii() else ""
        return text if text.isidentifier() else None
    except (DlibFormatError, UnicodeDecodeError):
        return None
    finally:
        f.seek(start)


# ---------------------------------------------------------------- layer records


@dataclass
class Layer:
    """One computational layer's record: `kind` is dlib's version string, e.g. "con_4"."""

    kind: str
    fields: dict = field(default_factory=dict)

    @property
    def type(self) -> str:  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
        return self.kind.rstrip("0123456789").rstrip("_")

    def __repr__(self) -> str:
        brief = {k: (v.shape if isinstance(v, np.ndarray) else v) for k, v in self.fields.items()}
        return f"{self.kind}{brief}"


def _split_params(params: np.ndarray, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Cut a layer's flat params tensor into consecutive aliases of the given shapes."""
    flat, out, offset = params.reshape(-1), [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[offset : offset + n].reshape(shape))
        offset += n
    if offset != flat.size:
        raise DlibFormatError(f"params hold {flat.size} values, aliases cover {offset}")
    return out


def read_con(f: BinaryIO, kind: str) -> dict:
    if kind != "con_4":
        raise DlibFormatError(f"unsupported convolution record {kind!r} (this reader knows con_4)")
    params = read_tensor(f)
    num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x = (read_int(f) for _ in range(7))
    filters, biases = read_alias(f), read_alias(f)
    for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
        read_float(f)
    weight, bias = _split_params(params, filters, biases)
    if weight.shape[0] != num_filters or weight.shape[2:] != (nr, nc):
        raise DlibFormatError(f"con_ filters {weight.shape} disagree with {num_filters}x{nr}x{nc}")
    return dict(weight=weight, bias=bias.reshape(-1), stride=(stride_y, stride_x), padding=(pad_y, pad_x))


def read_affine(f: BinaryIO, kind: str) -> dict:
    if kind != "affine_":
        raise DlibFormatError(f"unsupported affine record {kind!r}")
    params = read_tensor(f)
    gamma, beta = _split_params(params, read_alias(f), read_alias(f))
    mode = read_int(f)  # 0: CONV_MODE (one γ, β per channel), 1: FC_MODE (per element)
    if mode != 0:
        raise DlibFormatError("only conv-mode affine layers are supported")
    return dict(gamma=gamma.reshape(-1), beta=beta.reshape(-1))


def read_pool(f: BinaryIO, kind: str) -> dict:
    if kind not in ("max_pool_2", "avg_pool_2"):
        raise DlibFormatError(f"unsupported pooling record {kind!r}")
    nr, nc, stride_y, stride_x, pad_y, pad_x = (read_int(f) for _ in range(6))
    # nr = nc = 0 means "the whole input" (avg_pool_everything).
    return dict(window=(nr, nc), stride=(stride_y, stride_x), padding=(pad_y, pad_x))


def read_fc(f: BinaryIO, kind: str) -> dict:
    if kind != "fc_2":
        raise DlibFormatError(f"unsupported fully-connected record {kind!r}")
    num_outputs, num_inputs = read_int(f), read_int(f)
    params = read_tensor(f)
    weights, biases = read_alias(f), read_alias(f)
    bias_mode = read_int(f)  # 0: FC_HAS_BIAS, 1: FC_NO_BIAS
    for _ in range(4):
        read_float(f)
    shapes = [weights] + ([biases] if bias_mode == 0 else [])
    parts = _split_params(params, *shapes)
    # dlib stores the weights as (num_inputs, num_outputs): output = input · W.
    weight = parts[0].reshape(num_inputs, num_outputs).T.copy()
    bias = parts[1].reshape(-1) if bias_mode == 0 else None
    return dict(weight=weight, bias=bias)


_DETAIL_READERS = {
    "con": read_con,
    "affine": read_affine,
    "max_pool": read_pool,
    "avg_pool": read_pool,
    "fc": read_fc,
    "relu": lambda f, kind: {},
    "add_prev": lambda f, kind: {},
}


def read_layer_details(f: BinaryIO) -> Layer:
    kind = read_string(f)
    layer = Layer(kind)
    reader = _DETAIL_READERS.get(layer.type)
    if reader is None:
        raise DlibFormatError(f"unknown layer record {kind!r} at offset {f.tell()}")
    layer.fields = reader(f, kind)
    return layer


@dataclass
class DlibNetwork:
    """A dlib network file, flattened: loss, input mean and layers from the input upwards."""

    loss: dict
    input_mean: tuple[float, float, float]  # R, G, B
    input_size: tuple[int, int]
    layers: list[Layer]
    wrappers: list[int]  # version integers, outermost first: 1 = tag/skip, else a layer


def read_network(source: Path | str | bytes) -> DlibNetwork:
    """Parse a dlib loss_metric network with an input_rgb_image_sized input layer."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    f = io.BytesIO(data)

    loss_version, loss_kind = read_int(f), read_string(f)
    if loss_version != 1 or loss_kind != "loss_metric_2":
        raise DlibFormatError(f"expected a loss_metric_2 network, found {loss_kind!r} (v{loss_version})")
    loss = dict(margin=read_float(f), distance_threshold=read_float(f))

    wrappers = []
    while not (_peek_string(f) or "").startswith("input"):
        wrappers.append(read_int(f))
        if len(wrappers) > 10_000:
            raise DlibFormatError("no input layer found after the layer versions")

    input_kind = read_string(f)
    if input_kind != "input_rgb_image_sized":
        raise DlibFormatError(f"unsupported input layer {input_kind!r}")
    mean = (read_float(f), read_float(f), read_float(f))
    size = (read_int(f), read_int(f))

    # The innermost add_layer (over the input) has its own record tail (versions 2 and 3).
    # Above it, version 1 means tag/skip: an add_layer of dlib's old version 1 would look the
    # same, so only version-2 layers are accepted there.
    first_version, others = wrappers[-1], [v for v in wrappers[:-1] if v != 1]
    if first_version not in (2, 3) or any(v != 2 for v in others):
        raise DlibFormatError(f"unsupported add_layer versions {sorted(set(others + [first_version]))}")
    first = read_layer_details(f)
    _read_layer_state(f)  # ..., x_grad, cached_output, grad_final
    if first_version == 3:
        read_int(f)  # sample expansion factor
    layers = [first]
    for _ in others:
        layers.append(read_layer_details(f))
        _read_layer_state(f)  # ..., x_grad, cached_output, params_grad
    if f.tell() != len(data):
        raise DlibFormatError(f"{len(data) - f.tell()} bytes left after the last layer")
    return DlibNetwork(loss, mean, size, layers, wrappers)


def _read_layer_state(f: BinaryIO) -> None:
    # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled,
    # then three training-time tensors (empty in a cleaned network; skipped whatever their size).
    for _ in range(3):
        read_bool(f)
    for _ in range(3):
        read_tensor(f)


# ---------------------------------------------------------------- torch modules


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the output takes the larger of each dimension; missing values are 0.

    Channels differ at every down-sampling unit; in this network the spatial sizes differ too
    where a stride-2 3×3 convolution and a 2×2 average pool disagree (8→3 vs 8→4, 4→1 vs 4→2).
    """
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape, b.shape, strict=True)]

    def grow(t: torch.Tensor) -> torch.Tensor:
        # F.pad takes (W, H, C) pairs from the last dimension backwards; zeros at the end.
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's affine_ in conv mode: x·γ + β per channel (a frozen batch norm)."""

    gamma: torch.Tensor  # buffers, registered in __init__
    beta: torch.Tensor

    def __init__(self, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("gamma", torch.from_numpy(gamma.copy()).view(1, -1, 1, 1))
        self.register_buffer("beta", torch.from_numpy(beta.copy()).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class Pool(nn.Module):
    """dlib's max_pool_/avg_pool_; a 0×0 window pools the whole input (avg_pool_everything).

    Output size is 1 + (in + 2·pad − window) // stride, as in dlib (torch's floor mode). Every
    pool in this network has padding 0; count_include_pad=False follows dlib's exclude-padding
    average for other files, untested here.
    """

    def __init__(self, kind: str, window: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]):
        super().__init__()
        self.kind, self.window, self.stride, self.padding = kind, window, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = (self.window[0] or x.shape[2], self.window[1] or x.shape[3])
        if self.kind == "max_pool":
            return F.max_pool2d(x, window, self.stride, self.padding)
        return F.avg_pool2d(x, window, self.stride, self.padding, count_include_pad=False)

    def extra_repr(self) -> str:
        return f"{self.kind}, window={self.window}, stride={self.stride}, padding={self.padding}"


def _conv(layer: Layer) -> nn.Conv2d:
    weight, bias = layer.fields["weight"], layer.fields["bias"]
    conv = nn.Conv2d(
        weight.shape[1], weight.shape[0], weight.shape[2:], layer.fields["stride"], layer.fields["padding"]
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        assert conv.bias is not None  # nn.Conv2d has one unless bias=False
        conv.bias.copy_(torch.from_numpy(bias))
    return conv


class ResidualUnit(nn.Module):
    """dnn_face_recognition_ex's `ares` / `ares_down`:

    block = affine(con3x3 s1(relu(affine(con3x3 s(x)))))
    ares      = relu(block(x) + x)
    ares_down = relu(block(x) + avg_pool 2x2 s2(x))      (dlib_add zero-fills the mismatch)
    """

    def __init__(self, records: Sequence[Layer]) -> None:
        super().__init__()
        con1, aff1, _relu, con2, aff2, *rest = records
        self.conv1, self.affine1 = _conv(con1), Affine(**aff1.fields)
        self.conv2, self.affine2 = _conv(con2), Affine(**aff2.fields)
        self.shortcut_pool = Pool("avg_pool", **rest[0].fields) if rest[0].type == "avg_pool" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = x if self.shortcut_pool is None else self.shortcut_pool(x)
        return F.relu(dlib_add(y, shortcut))


_STEM = ["con", "affine", "relu", "max_pool"]
_UNIT = ["con", "affine", "relu", "con", "affine", "add_prev", "relu"]
_UNIT_DOWN = ["con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu"]
_HEAD = ["avg_pool", "fc"]


def group_layers(layers: Sequence[Layer]) -> tuple[list[Layer], list[list[Layer]], list[Layer]]:
    """Split the flat records into stem, residual units and head, checking the anet_type layout."""
    types = [layer.type for layer in layers]
    if types[:4] != _STEM or types[-2:] != _HEAD or layers[-2].fields["window"] != (0, 0):
        raise DlibFormatError(f"not dlib's face-recognition ResNet layout: {types[:4]} … {types[-2:]}")
    units, i = [], len(_STEM)
    while i < len(layers) - len(_HEAD):
        for pattern in (_UNIT, _UNIT_DOWN):
            if types[i : i + len(pattern)] == pattern:
                units.append(list(layers[i : i + len(pattern)]))
                i += len(pattern)
                break
        else:
            raise DlibFormatError(f"unexpected layer sequence at record {i}: {types[i : i + 8]}")
    return list(layers[:4]), units, list(layers[-2:])


class DlibResNetTorch(nn.Module):
    """The anet_type of dnn_face_recognition_ex.cpp: (N, 3, 150, 150) uint8-range RGB → (N, 128).

    Takes raw 0..255 RGB values (any float dtype) and applies dlib's input_rgb_image_sized
    normalisation, (pixel − mean) / 256, itself.
    """

    mean: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, network: DlibNetwork) -> None:
        super().__init__()
        stem, units, head = group_layers(network.layers)
        tags = sum(1 for v in network.wrappers if v == 1)
        expected_tags = sum(1 + 2 * (unit[5].type == "avg_pool") for unit in units)  # tag1 (+ tag2, skip1)
        if tags != expected_tags:
            raise DlibFormatError(f"{tags} tag/skip layers in the file, the layout needs {expected_tags}")
        self.input_size = network.input_size
        self.register_buffer("mean", torch.tensor(network.input_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            _conv(stem[0]), Affine(**stem[1].fields), nn.ReLU(), Pool("max_pool", **stem[3].fields)
        )
        self.units = nn.Sequential(*(ResidualUnit(unit) for unit in units))
        self.pool = Pool("avg_pool", **head[0].fields)
        fc = head[1].fields
        self.fc = nn.Linear(fc["weight"].shape[1], fc["weight"].shape[0], bias=fc["bias"] is not None)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(fc["weight"]))
            if fc["bias"] is not None:
                self.fc.bias.copy_(torch.from_numpy(fc["bias"]))

    @classmethod
    def from_dat(cls, path: Path | str) -> DlibResNetTorch:
        return cls(read_network(path))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """dlib's input_rgb_image_sized: (pixel − mean) / 256, in float32 (exact like dlib's)."""
        return (rgb.float() - self.mean) / 256.0

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.normalize(rgb)
        x = self.units(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


# ---------------------------------------------------------------- embedder


class DlibResNetTorchEmbedder(NormalisedEmbeddings):
    """Drop-in for `DlibResNetEmbedder` (same model id, weights and vectors), run by torch.

    Batches of any size (split into `max_batch` chunks), CUDA with fp16 autocast when the device
    is CUDA, fp32 on the CPU. A CUDA request without CUDA raises DeviceUnavailableError.
    """

    model_id = "dlib-resnet-v1"
    dim = 128
    chip_size = 150
    chip_template = "dlib150"
    default_threshold = 0.943

    def __init__(self, device: str | torch.device = "auto", weights: Path | None = None, max_batch: int = 64) -> None:
        self._device = resolve_device(str(device))
        self.compute_dtype = autocast_dtype(self._device)
        self.max_batch = max_batch
        model = DlibResNetTorch.from_dat(weights or weight_path(WEIGHTS))
        # Channels-last: the HWC chips are channels-last already, and mixing layouts costs ~2×
        # at batch 1 on the CPU; on CUDA it is the layout fp16 tensor cores want.
        model = model.eval().requires_grad_(False).to(self._device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format
        self._model = model

    @property
    def device(self) -> torch.device:
        return self._device

    def embed_raw(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 128) float32 descriptors in dlib's native space (not normalised)."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        check_chips(chips, self.chip_size)
        out = [
            self.run(np.stack(chips[i : i + self.max_batch]), self.compute_dtype)
            for i in range(0, len(chips), self.max_batch)
        ]
        return np.concatenate(out)

    @torch.inference_mode()
    def run(self, batch: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB → (N, 128) float32, computing in `dtype` (autocast)."""
        x = torch.from_numpy(batch).to(self._device).permute(0, 3, 1, 2)
        # The input normalisation stays float32 under autocast (elementwise ops keep their dtype).
        ctx = torch.autocast(self._device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with ctx:
            y = self._model(x)
        return y.float().cpu().numpy()
