"""Bring-your-own recognizers: a small torch model exported to ONNX and TorchScript, loaded back."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from facepay.models.device import DeviceUnavailableError
from services.recognizer.byo import (
    BYO_DEFAULT_THRESHOLD,
    ByoModelError,
    InputSpec,
    OnnxEmbedder,
    TorchScriptEmbedder,
    is_byo_spec,
    load_byo,
)

# Not pytest.importorskip("onnx2torch"): a plain import of it fails where torchvision cannot load,
# and leaves its converters half-registered; facepay.models.onnx_torch.import_onnx2torch handles that case.
for _package in ("onnx", "onnx2torch"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed", allow_module_level=True)

# torch 2.13 deprecates torch.jit (trace/load) in favour of torch.export; TorchScript files
# operators already have still load, which is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
DIM = 64


class TinyArcFace(nn.Module):
    """conv → PReLU → pool → linear: ArcFace-shaped input (N, 3, 112, 112) → (N, 64)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.PReLU(16)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, DIM)
        with torch.no_grad():  # non-trivial batch-norm statistics
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def chips(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8))


def reference(model: nn.Module, batch: list[np.ndarray], spec: InputSpec = InputSpec()) -> np.ndarray:
    """What the operator's model gives on these chips, L2-normalised, straight from torch."""
    assert not model.training  # (torch.onnx.export restores train() on the module it exported)
    x = torch.from_numpy(np.stack(batch)).float()
    if spec.channels == "BGR":
        x = x.flip(-1)
    x = (x - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    with torch.no_grad():
        y = model(x.permute(0, 3, 1, 2)).numpy()
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def export_onnx(model: nn.Module, path, dynamo: bool = True) -> None:
    x = torch.zeros(2, 3, 112, 112)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # torch's current exporter; it writes the weights to path + ".data"
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            )
        else:  # the TorchScript-based exporter: one self-contained file
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            )


def export_torchscript(model: nn.Module, path) -> None:
    torch.jit.trace(model, torch.zeros(2, 3, 112, 112)).save(str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    a, b = TinyArcFace(seed=0), TinyArcFace(seed=1)
    files = {
        "onnx_a": d / "dyn" / "arcface.onnx",
        "onnx_b": d / "legacy" / "arcface.onnx",  # same stem, other weights, other exporter
        "onnx_a_legacy": d / "legacy-a" / "arcface_a.onnx",
        "ts_a": d / "arcface_a.pt",
        "ts_b": d / "arcface_b.pt",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(a, files["onnx_a"], dynamo=True)
    export_onnx(b, files["onnx_b"], dynamo=False)
    export_onnx(a, files["onnx_a_legacy"], dynamo=False)
    export_torchscript(a, files["ts_a"])
    export_torchscript(b, files["ts_b"])
    return {"a": a, "b": b, **files}


@pytest.mark.parametrize("kind", ["onnx_a", "onnx_a_legacy", "ts_a"])
def test_embeddings_match_the_torch_module(models, kind):
    cls = TorchScriptEmbedder if kind.startswith("ts") else OnnxEmbedder
    emb = cls(models[kind], device="cpu")
    assert emb.dim == DIM  # read from the model, not configured
    assert emb.chip_size == 112 and emb.chip_template == "arcface112"
    assert emb.device == torch.device("cpu")
    assert emb.default_threshold == BYO_DEFAULT_THRESHOLD
    if cls is OnnxEmbedder:
        assert emb.backend == "onnx2torch"  # converted, checked against onnxruntime, run by torch
    batch = chips(16)
    out = emb.embed(batch)
    assert out.shape == (16, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, reference(models["a"], batch), atol=1e-5)
    # Batches of 1 and 16 give the same vectors; an empty batch gives (0, dim).
    singles = np.concatenate([emb.embed([c]) for c in batch])
    np.testing.assert_allclose(singles, out, atol=1e-5)
    assert emb.embed([]).shape == (0, DIM)
    # More chips than max_batch are split and joined in order.
    emb.max_batch = 5
    np.testing.assert_allclose(emb.embed(batch), out, atol=1e-5)


def test_raw_output_is_the_model_output(models):
    emb = OnnxEmbedder(models["onnx_a"], device="cpu")
    batch = chips(3)
    x = (torch.from_numpy(np.stack(batch)).float() - 127.5) / 127.5
    with torch.no_grad():
        expected = models["a"](x.permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(emb.embed_raw(batch), expected, rtol=1e-4, atol=1e-5)


def test_input_convention_is_configurable(models):
    spec = InputSpec(mean=(123.7, 116.3, 103.5), std=58.0, channels="BGR")
    batch = chips(4)
    for emb in (
        OnnxEmbedder(models["onnx_a"], device="cpu", input_spec=spec),
        TorchScriptEmbedder(models["ts_a"], device="cpu", input_spec=spec),
    ):
        assert emb.input_spec == spec
        np.testing.assert_allclose(emb.embed(batch), reference(models["a"], batch, spec), atol=1e-5)
    with pytest.raises(ValueError):
        InputSpec(size=160)
    with pytest.raises(ValueError):
        InputSpec(channels="GRB")  # type: ignore[arg-type]


def test_onnxruntime_backend_agrees(models):
    pytest.importorskip("onnxruntime")
    emb = OnnxEmbedder(models["onnx_a"], device="cpu", backend="onnxruntime")
    assert emb.backend == "onnxruntime" and emb.dim == DIM
    batch = chips(16)
    np.testing.assert_allclose(emb.embed(batch), reference(models["a"], batch), atol=1e-5)


def test_failed_conversion_falls_back_to_onnxruntime_loudly(models, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    import services.recognizer.byo as byo

    def broken(_model):
        raise NotImplementedError("Converter is not implemented (OperationDescription(op_type='Exotic'))")

    monkeypatch.setattr(byo, "import_onnx2torch", lambda: SimpleNamespace(convert=broken))
    with caplog.at_level(logging.WARNING, logger="services.recognizer.byo"):
        emb = OnnxEmbedder(models["onnx_a"], device="cpu")
    assert emb.backend == "onnxruntime"
    assert any("onnxruntime on the CPU" in r.getMessage() and "Exotic" in r.getMessage() for r in caplog.records)
    batch = chips(2)
    np.testing.assert_allclose(emb.embed(batch), reference(models["a"], batch), atol=1e-5)
    with pytest.raises(ByoModelError, match=r"onnx2torch cannot run"):
        OnnxEmbedder(models["onnx_a"], device="cpu", backend="onnx2torch")


def test_conversion_that_disagrees_with_onnxruntime_is_not_used(models, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    import services.recognizer.byo as byo

    monkeypatch.setattr(byo, "VERIFY_TOLERANCE", -1.0)  # every conversion "disagrees"
    with caplog.at_level(logging.WARNING, logger="services.recognizer.byo"):
        emb = OnnxEmbedder(models["onnx_a"], device="cpu")
    assert emb.backend == "onnxruntime"
    assert any("differs from onnxruntime" in r.getMessage() for r in caplog.records)


def test_onnx2torch_stand_in_does_not_leak():
    from facepay.models.onnx_torch import import_onnx2torch

    assert hasattr(import_onnx2torch(), "convert")
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None), "the torchvision stand-in stayed in sys.modules"


def test_onnx2torch_imports_beside_a_broken_torchvision(models, tmp_path):
    """PyPI's torchvision (a CUDA build) raises RuntimeError on import with the CPU torch wheel."""
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = (
        "import sys, numpy as np\n"
        "from services.recognizer.byo import OnnxEmbedder\n"
        f"e = OnnxEmbedder({str(models['onnx_a'])!r}, device='cpu')\n"
        "assert e.backend == 'onnx2torch', e.backend\n"
        "assert 'torchvision' not in sys.modules\n"
        "print(e.embed([np.zeros((112, 112, 3), np.uint8)]).shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"(1, {DIM})" in run.stdout


def test_model_ids(models, tmp_path):
    a1 = OnnxEmbedder(models["onnx_a"], device="cpu")
    a2 = OnnxEmbedder(models["onnx_a"], device="cpu")
    b = OnnxEmbedder(models["onnx_b"], device="cpu")
    assert a1.model_id == a2.model_id  # stable for the same file
    assert a1.model_id.startswith("byo-arcface-") and len(a1.model_id) == len("byo-arcface-") + 12
    assert b.model_id != a1.model_id  # same stem, different weights
    ts_a = TorchScriptEmbedder(models["ts_a"], device="cpu")
    assert ts_a.model_id == TorchScriptEmbedder(models["ts_a"], device="cpu").model_id
    assert ts_a.model_id != TorchScriptEmbedder(models["ts_b"], device="cpu").model_id
    assert ts_a.model_id.startswith("byo-arcface_a-")
    # A copy elsewhere is the same model; the id does not depend on the directory.
    copy = tmp_path / "arcface_a.pt"
    shutil.copy(models["ts_a"], copy)
    assert TorchScriptEmbedder(copy, device="cpu").model_id == ts_a.model_id
    # An explicit name is used as given (the operator keeps one gallery across re-exports).
    assert TorchScriptEmbedder(models["ts_a"], device="cpu", name="acme-r50-v2").model_id == "acme-r50-v2"
    with pytest.raises(ValueError):
        TorchScriptEmbedder(models["ts_a"], device="cpu", name="has space/slash")
    # The same file fed another way gives other vectors: another id; the default spelled out does not.
    bgr = TorchScriptEmbedder(models["ts_a"], device="cpu", input_spec=InputSpec(channels="BGR")).model_id
    assert bgr.startswith(ts_a.model_id + "-in") and bgr != ts_a.model_id
    assert TorchScriptEmbedder(models["ts_a"], device="cpu", input_spec=InputSpec()).model_id == ts_a.model_id


def test_model_id_covers_onnx_external_data(models, tmp_path):
    """torch's exporter keeps the weights in model.onnx.data: new weights there, new id."""
    src = models["onnx_a"]
    data = [p for p in src.parent.iterdir() if p != src]
    assert data, "expected the exporter to write an external-data file"
    for p in [src, *data]:
        shutil.copy(p, tmp_path / p.name)
    before = OnnxEmbedder(tmp_path / src.name, device="cpu", verify=False).model_id
    assert before == OnnxEmbedder(src, device="cpu").model_id
    weights = tmp_path / data[0].name
    raw = bytearray(weights.read_bytes())
    raw[-4:] = np.float32(0.125).tobytes()  # the last weight (a bias): same file size, new value
    weights.write_bytes(bytes(raw))
    assert OnnxEmbedder(tmp_path / src.name, device="cpu", verify=False).model_id != before


def test_load_byo_specs(models):
    emb = load_byo(f"onnx:{models['onnx_a']}", device="cpu")
    assert isinstance(emb, OnnxEmbedder) and emb.dim == DIM
    emb = load_byo(f"torchscript:{models['ts_a']}", device="cpu")
    assert isinstance(emb, TorchScriptEmbedder) and emb.dim == DIM
    assert is_byo_spec("onnx:/x.onnx") and is_byo_spec("TorchScript:/x.pt") and not is_byo_spec("dlib-resnet-v1")
    for bad in ("dlib-resnet-v1", "tflite:/m.tflite", "onnx:", "onnx:  "):
        with pytest.raises(ValueError):
            load_byo(bad, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("kind", ["onnx_a", "ts_a"])
def test_cuda_without_a_gpu_raises(models, kind):
    cls = TorchScriptEmbedder if kind.startswith("ts") else OnnxEmbedder
    with pytest.raises(DeviceUnavailableError):
        cls(models[kind], device="cuda")
    with pytest.raises(DeviceUnavailableError):
        load_byo(f"{'torchscript' if cls is TorchScriptEmbedder else 'onnx'}:{models[kind]}", device="cuda")
    # The onnxruntime fallback is CPU-only: asking for it with CUDA is refused too.
    if cls is OnnxEmbedder:
        with pytest.raises(DeviceUnavailableError):
            OnnxEmbedder(models[kind], device="cuda", backend="onnxruntime")


def test_missing_or_bad_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=r"nope.onnx.*does not exist"):
        OnnxEmbedder(missing, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        TorchScriptEmbedder(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_byo(f"onnx:{missing}", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"directory"):
        TorchScriptEmbedder(tmp_path, device="cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ByoModelError):
        OnnxEmbedder(junk, device="cpu")
    with pytest.raises(ByoModelError):
        TorchScriptEmbedder(junk, device="cpu")


@pytest.mark.parametrize("kind", ["onnx", "ONNX", "Onnx", " onnx", "TorchScript"])
def test_the_recognizer_setting_reads_a_byo_spec_the_way_load_byo_does(tmp_path, kind):
    from services.recognizer.embedder import load_embedder

    # One parser: a spec load_byo accepts is never "an unknown recognizer model" to the worker.
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_embedder(f"{kind}:{tmp_path / 'nope.model'}", device="cpu")


def test_wrong_chips_and_wrong_graphs_are_refused(models, tmp_path):
    emb = TorchScriptEmbedder(models["ts_a"], device="cpu")
    with pytest.raises(ValueError, match=r"112x112x3 uint8"):
        emb.embed([np.zeros((150, 150, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"112x112x3 uint8"):
        emb.embed([np.zeros((112, 112, 3), np.float32)])
    # A graph made for 160x160 inputs cannot read the aligner's 112x112 chips.
    wrong = tmp_path / "facenet160.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TinyArcFace(),
            (torch.zeros(1, 3, 160, 160),),
            str(wrong),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": {0: "b"}},
        )
    with pytest.raises(ByoModelError, match=r"112"):
        OnnxEmbedder(wrong, device="cpu")


def test_fixed_batch_graph_runs_one_chip_at_a_time(models, tmp_path):
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            models["a"],
            (torch.zeros(1, 3, 112, 112),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
        )
    emb = OnnxEmbedder(path, device="cpu")
    assert emb.max_batch == 1 and emb.dim == DIM
    batch = chips(3)
    np.testing.assert_allclose(emb.embed(batch), reference(models["a"], batch), atol=1e-5)


def test_self_normalising_graph_takes_raw_pixels(models, tmp_path):
    """InsightFace's mxnet exports subtract and scale inside the graph: mean 0, std 1 then."""

    class Normalising(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner((x - 127.5) * (1 / 127.5))

    path = tmp_path / "mxnet_style.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Normalising(models["a"]).eval(),
            (torch.zeros(2, 3, 112, 112),),
            str(path),
            dynamo=False,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "b"}, "fc1": {0: "b"}},
        )
    emb = OnnxEmbedder(path, device="cpu")
    assert emb.backend == "onnx2torch"  # opset 20 (the exporter's default), lowered to 17 for it
    assert emb.input_spec.mean == (0.0, 0.0, 0.0) and emb.input_spec.std == (1.0, 1.0, 1.0)
    batch = chips(4)
    np.testing.assert_allclose(emb.embed(batch), reference(models["a"], batch), atol=1e-5)


class IResNetStyle(nn.Module):
    """arcface_torch's iresnet layout in miniature: stem, one IBasicBlock, BN-Dropout-FC-BN1d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8)
        self.block = nn.Sequential(
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 3, 1, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.PReLU(8),
            nn.Conv2d(8, 8, 3, 2, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.down = nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        self.bn2, self.dropout = nn.BatchNorm2d(8), nn.Dropout(0.4)
        self.fc, self.features = nn.Linear(8 * 56 * 56, DIM), nn.BatchNorm1d(DIM)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.block(x) + self.down(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def test_insightface_style_export(tmp_path):
    """Opset 11, weights also listed as graph inputs (keep_initializers_as_inputs), name "data"."""
    model = IResNetStyle()
    path = tmp_path / "w600k_mini.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 3, 112, 112),),
            str(path),
            dynamo=False,
            opset_version=11,
            keep_initializers_as_inputs=True,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "b"}, "fc1": {0: "b"}},
        )
    emb = load_byo(f"onnx:{path}", device="cpu")
    assert emb.backend == "onnx2torch" and emb.dim == DIM and emb.input_spec == InputSpec()
    batch = chips(16)
    out = emb.embed(batch)
    np.testing.assert_allclose(out, reference(model, batch), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([emb.embed([c]) for c in batch]), out, atol=1e-5)
