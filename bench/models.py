"""Milliseconds per face of each model, at batch 1 and batch 16, measured in one run.

    .venv/bin/python bench/models.py [--repeats 7] [--warmup 2] [--budget 6] [--device cpu]

Input: scikit-image's astronaut (public domain, one face), letterboxed into a 640×480 frame,
so the bench runs on a fresh machine with only the model cache (`facepay models fetch`). The
face found by MTCNN in that frame feeds the other models: its box to the landmark models, the
68 landmarks to head pose, the aligned chips (dlib150, arcface112) to the recognizers.

Each model runs at two CPU thread settings: 1 thread, and torch's default (`torch.get_num_threads()`
at start, = physical cores). The setting is applied to torch and OpenCV (`torch.set_num_threads`,
`cv2.setNumThreads`). dlib-bin does not follow either of them: its numbers are as the wheel runs.
Batch 16 is 16 copies of the face (16 copies of the frame for the detector) in one call; models
that do not batch (dlib) loop inside that call. Each cell: `--warmup` calls, then the median of
`--repeats` timed calls (fewer, at least 3, when a cell would exceed `--budget` seconds),
divided by the batch size: ms per face (per image for the detector). The share of CPU time
other processes used during the run is printed with the table: on a shared machine they take
cores, and the 2-thread numbers suffer most (a busy core stalls every parallel region).

The TF.js-model wrappers (FaceMesh, age/gender faceres and gear, passive liveness, the FaceRes
embedder) are imported under try/except ImportError: one that is absent, does not load, or
fails while timed is listed under the table instead of stopping the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 16)


@dataclass
class Case:
    name: str  # what is measured
    model_id: str
    unit: str  # "face" or "image"
    run: Callable[[int], object]  # run(n): one call on a batch of n
    device: str = "cpu"


@dataclass
class Inputs:
    frame: np.ndarray  # 640×480 RGB
    box: tuple[float, float, float, float]  # MTCNN's face box in the frame
    points5: np.ndarray  # MTCNN's five points
    landmarks68: np.ndarray
    chip150: np.ndarray  # dlib_face_chip
    chip112: np.ndarray  # ARCFACE_112 chip


def astronaut_frame(width: int = 640, height: int = 480) -> np.ndarray:
    """The astronaut (512×512) scaled to the frame height and centred on a grey 640×480 frame."""
    from skimage import data

    face = cv2.resize(data.astronaut(), (height, height), interpolation=cv2.INTER_AREA)
    frame = np.full((height, width, 3), 114, dtype=np.uint8)
    x0 = (width - height) // 2
    frame[:, x0 : x0 + height] = face
    return frame


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()} ({os.cpu_count()} logical cores)"


# ---------------------------------------------------------------- cases


def core_cases(device: torch.device, notes: list[str]) -> tuple[list[Case], Inputs]:
    from services.aligner.geometry import align_face, five_points_from_68
    from services.aligner.landmarks import DlibLandmarks68, dlib_face_chip
    from services.detector.mtcnn import MTCNN
    from services.pose.headpose import head_pose
    from services.recognizer.dlib_resnet_torch import DlibResNetTorchEmbedder
    from services.recognizer.embedder import DlibResNetEmbedder

    frame = astronaut_frame()
    mtcnn = MTCNN(device=device)
    faces = mtcnn.detect([frame])[0]
    if not faces:
        raise SystemExit("MTCNN found no face in the astronaut frame; cannot feed the other models")
    face = faces[0]
    box = tuple(float(v) for v in face.box)
    landmarks = DlibLandmarks68(device="cpu")
    lm = landmarks.predict([frame], [box])[0]
    inputs = Inputs(
        frame,
        box,
        np.asarray(face.points5, dtype=np.float32),
        lm,
        dlib_face_chip(frame, lm),
        align_face(frame, five_points_from_68(lm)),
    )
    size = (frame.shape[1], frame.shape[0])
    notes.append(
        f"face: box {tuple(round(v) for v in box)} ({box[2] - box[0]:.0f}×{box[3] - box[1]:.0f} px) "
        f"in the 640×480 frame, MTCNN score {face.score:.3f}"
    )

    cases = [
        Case(
            "MTCNN detector, 640×480 frame",
            mtcnn.model_id,
            "image",
            lambda n: mtcnn.detect([frame] * n),
            str(mtcnn.device),
        ),
        *detector_cases(device, frame, notes),
        Case(
            "dlib 68-point landmarks", landmarks.model_id, "face", lambda n: landmarks.predict([frame] * n, [box] * n)
        ),
        Case(
            "head pose (solvePnP, 68 pts)",
            "headpose-solvepnp",
            "face",
            lambda n: [head_pose(lm, size) for _ in range(n)],
        ),
    ]
    torch_resnet = DlibResNetTorchEmbedder(device=device)
    cases.append(
        Case(
            "dlib ResNet, torch port",
            torch_resnet.model_id + " (torch)",
            "face",
            lambda n: torch_resnet.embed([inputs.chip150] * n),
            str(torch_resnet.device),
        )
    )
    if device.type == "cpu":
        dlib_resnet = DlibResNetEmbedder(device="cpu")
        cases.append(
            Case(
                "dlib ResNet, dlib-bin (reference)",
                dlib_resnet.model_id + " (dlib)",
                "face",
                lambda n: dlib_resnet.embed([inputs.chip150] * n),
            )
        )
    else:
        notes.append("dlib-bin ResNet: CPU only, not run on " + str(device))
    return cases, inputs


def detector_cases(device: torch.device, frame: np.ndarray, notes: list[str]) -> list[Case]:
    """The other detectors of the registry on the same frame (bench/detectors.py: their misses)."""
    from services.detector.detectors import load_detector

    cases = []
    for name, label in (
        ("scrfd-500m", "SCRFD-500M detector @320"),
        ("scrfd-500m@640", "SCRFD-500M detector @640"),
        ("blazeface", "BlazeFace front (128) detector"),
        ("blazeface-back", "BlazeFace back (256) detector"),
    ):
        try:
            detector = load_detector(name, device)
        except Exception as exc:  # noqa: BLE001 - whatever stops a model loading is noted in the report
            notes.append(f"{label}: not benchmarked, does not load ({type(exc).__name__}: {exc})")
            continue
        cases.append(
            Case(
                label + ", 640×480",
                detector.model_id,
                "image",
                (lambda d: lambda n: d.detect([frame] * n))(detector),
                str(detector.device),
            )
        )
    return cases


def optional_cases(device: torch.device, inputs: Inputs, notes: list[str]) -> list[Case]:
    """Wrappers colleagues are adding: each imported under try/except ImportError; one that is
    absent, or does not load (e.g. weights not in the model cache), becomes a note."""
    frame, box, points5, chip150 = inputs.frame, inputs.box, inputs.points5, inputs.chip150

    def facemesh() -> Case:
        from services.aligner.facemesh import FaceMesh

        m = FaceMesh(device=device)
        return Case(
            "MediaPipe FaceMesh (2 passes)",
            m.model_id,
            "face",
            lambda n: m.predict([frame] * n, [box] * n, [points5] * n),
            str(m.device),
        )

    def age_gender(which: str) -> Callable[[], Case]:
        def build() -> Case:
            from services.aligner.attributes import AgeGender

            m = AgeGender(device=device, model=which)
            return Case(
                f"age/gender, {which}",
                m.model_id,
                "face",
                lambda n: m.predict([frame] * n, [box] * n, [points5] * n),
                str(m.device),
            )

        return build

    def liveness() -> Case:
        from services.aligner.liveness import PassiveLiveness

        m = PassiveLiveness(device=device)
        return Case(
            "passive liveness (antispoof+livenessnet)",
            m.model_id,
            "face",
            lambda n: m.predict([frame] * n, [box] * n, [points5] * n),
            str(m.device),
        )

    def faceres() -> Case:
        from services.recognizer.faceres import FaceResEmbedder

        m = FaceResEmbedder(device=device)
        return Case("FaceRes embedder (1024-d)", m.model_id, "face", lambda n: m.embed([chip150] * n), str(m.device))

    cases: list[Case] = []
    for label, build in (
        ("FaceMesh (services/aligner/facemesh.py)", facemesh),
        ("age/gender faceres (services/aligner/attributes.py)", age_gender("faceres")),
        ("age/gender gear (services/aligner/attributes.py)", age_gender("gear")),
        ("passive liveness (services/aligner/liveness.py)", liveness),
        ("FaceRes embedder (services/recognizer/faceres.py)", faceres),
    ):
        try:
            cases.append(build())
        except ImportError as exc:
            notes.append(f"{label}: not benchmarked, does not import ({exc})")
        except Exception as exc:  # noqa: BLE001 - whatever stops a model loading is noted in the report
            notes.append(f"{label}: not benchmarked, does not load ({type(exc).__name__}: {exc})")
    return cases


# ---------------------------------------------------------------- timing


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much of the machine other processes used while the bench ran."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def share(self) -> float | None:
        """Other processes' CPU time / (wall time × cores), 0..1; None off Linux."""
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (self._own() - self.own)
        return max(0.0, others) / ((time.perf_counter() - self.wall) * (os.cpu_count() or 1))


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def time_case(
    case: Case, batch: int, warmup: int, repeats: int, budget_s: float, sync: Callable[[], None]
) -> tuple[float, int]:
    """(median ms per face, calls timed)."""
    for _ in range(warmup):
        case.run(batch)
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        case.run(batch)
        sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return 1000.0 * statistics.median(times) / batch, len(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell first")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per cell before stopping at 3 repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; dlib models are CPU only")
    parser.add_argument("--detectors-only", action="store_true", help="time the face detectors only")
    args = parser.parse_args(argv)

    from facepay.models.device import resolve_device

    default_threads = torch.get_num_threads()
    thread_settings = [1] if default_threads == 1 else [1, default_threads]
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    others = OtherLoad()
    notes: list[str] = []
    cases, inputs = core_cases(device, notes)
    if args.detectors_only:
        cases = [c for c in cases if "detector" in c.name]
    else:
        cases += optional_cases(device, inputs, notes)

    results: dict[tuple[str, int, int], float] = {}
    failed: dict[str, str] = {}
    for threads in thread_settings:
        set_threads(threads)
        for case in cases:
            for batch in BATCHES:
                if case.name in failed:
                    continue
                try:
                    ms, _ = time_case(case, batch, args.warmup, args.repeats, args.budget, sync)
                except Exception as exc:  # noqa: BLE001 - a wrapper still being written: note it, go on
                    failed[case.name] = (
                        f"{case.name}: failed at threads={threads}, batch={batch} ({type(exc).__name__}: {exc})"
                    )
                    continue
                results[(case.name, threads, batch)] = ms
                print(f"  {case.name:<40} threads={threads} batch={batch:<2} {ms:9.2f} ms", file=sys.stderr, flush=True)
    set_threads(default_threads)
    other_share = others.share()

    print(f"device  {device_name(device)}")
    print(
        f"torch   {torch.__version__}; OpenCV {cv2.__version__}; thread settings (torch and OpenCV): "
        f"1 and {default_threads} (torch's default here)"
    )
    print(
        f"timing  median of up to {args.repeats} calls after {args.warmup} warm-up calls, ms per face "
        f"(per image for the detector); batch 16 = 16 copies in one call"
    )
    if other_share is None:
        print("load    other processes' CPU use not measurable on this OS")
    else:
        print(
            f"load    other processes used {100 * other_share:.0f}% of the machine's CPU time during the run"
            + (
                " -- busy: they shared the cores (2 threads suffer most); read the numbers as upper bounds"
                if other_share > 0.10
                else " (quiet)"
            )
        )
    print()
    head = f"{'model':<40} {'id':<34} {'dev':<5}"
    sub = f"{'':<40} {'':<34} {'':<5}"
    for threads in thread_settings:
        label = f"{threads} thread" + ("s" if threads > 1 else "")
        head += f" | {label:^19}"
        sub += f" | {'b=1':>9} {'b=16':>9}"
    print(head)
    print(sub)
    print("-" * len(sub))
    for case in cases:
        row = f"{case.name:<40} {case.model_id[:34]:<34} {case.device:<5}"
        for threads in thread_settings:
            row += " | " + " ".join(
                f"{results[(case.name, threads, b)]:9.2f}" if (case.name, threads, b) in results else f"{'-':>9}"
                for b in BATCHES
            )
        print(row)
    print()
    print("notes:")
    print("  - dlib-bin (landmarks, reference ResNet) does not follow the thread setting")
    for note in [*notes, *failed.values()]:
        print(f"  - {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
