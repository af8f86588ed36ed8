"""Benchmark: the served network run by ONNX Runtime against PyTorch eager, side by side.

For each model (seed_cnn and resnet18 at 64×64, 3 channels, 10 classes; weights as built:
speed does not depend on them), in one process, alternating: batches of `--batch` float
images through the same `NormalizedClassifier` that a replica runs (normalisation, network,
softmax), PyTorch eager under `torch.inference_mode` against the ONNX export in an ONNX
Runtime session, both with `--threads` threads. Then the same export quantised to int8
(static, calibrated on the random inputs: its speed and size, not its accuracy; `mlsd export
--quantize int8` checks accuracy on real data). Prints one JSON line per model with images/s
and the ratios. Target: ONNX Runtime >= 1.5x PyTorch's images/s at batch 32; int8 size
<= 0.3x fp32.

    python bench/export_runtime.py [--batch 32] [--threads 2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlsd_ray import export
from mlsd_ray.tasks.image.checkpoint import LoadedModel
from mlsd_ray.tasks.image.data.transforms import Preprocessor
from mlsd_ray.tasks.image.export import NormalizedClassifier
from mlsd_ray.tasks.image.models import build_model


def rate(run, batch: np.ndarray, seconds: float) -> float:
    """Images/s of `run(batch)` over about `seconds`, after 3 warm-up calls."""
    for _ in range(3):
        run(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def measure(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    size, channels = 64, 3
    network = build_model(name, channels, size, 10).eval()
    pre = Preprocessor(size, channels, [0.5] * channels, [0.25] * channels,
                       [str(i) for i in range(10)])
    served = NormalizedClassifier(LoadedModel(network, pre, {"name": name}, {}, {})).eval()
    batch = np.random.default_rng(0).random((args.batch, channels, size, size),
                                            dtype=np.float32)
    fp32, int8 = scratch / f"{name}.onnx", scratch / f"{name}.int8.onnx"
    export.export_onnx(served, torch.from_numpy(batch[:2]), fp32, "pixels", "probabilities")
    export.quantize_int8(fp32, int8, [batch[i:i + 8] for i in range(0, len(batch), 8)],
                         "pixels")
    torch.set_num_threads(args.threads)
    sessions = {path: export.onnx_session(path, threads=args.threads) for path in (fp32, int8)}

    def eager(x: np.ndarray) -> None:
        with torch.inference_mode():
            served(torch.from_numpy(x))

    def onnx(path: Path):
        return lambda x: sessions[path].run(None, {"pixels": x})

    rates: dict[str, list[float]] = {"torch": [], "onnxruntime": [], "onnxruntime_int8": []}
    for _ in range(args.rounds):  # alternated, so drift in the machine hits all three
        rates["torch"].append(rate(eager, batch, args.seconds))
        rates["onnxruntime"].append(rate(onnx(fp32), batch, args.seconds))
        rates["onnxruntime_int8"].append(rate(onnx(int8), batch, args.seconds))
    best = {runtime: max(values) for runtime, values in rates.items()}
    return {"bench": "export_runtime", "model": name, "image_size": size, "batch": args.batch,
            "threads": args.threads,
            **{f"{runtime}_images_per_s": round(value, 1) for runtime, value in best.items()},
            "onnxruntime_over_torch": round(best["onnxruntime"] / best["torch"], 3),
            "int8_over_torch": round(best["onnxruntime_int8"] / best["torch"], 3),
            "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
            "int8_size_ratio": round(int8.stat().st_size / fp32.stat().st_size, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="seed_cnn,resnet18")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            print(json.dumps(measure(name, args, Path(scratch))), flush=True)


if __name__ == "__main__":
    main()
