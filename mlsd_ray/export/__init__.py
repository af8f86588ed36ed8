"""`mlsd export`: a registered model as a file that runs without Python's training stack.

A task builds the module to export: the served computation from the request's tensor to the
answer (tasks/*/export.py). This package writes it as ONNX or TorchScript, optionally
quantised to int8, checks it against the PyTorch model on the test split (`Parity`), and
registers the folder beside the model version in MLflow. Bad cases stop before anything is
written: a layer that does not export is named, and an int8 model whose score (the task's:
accuracy, R²) drops by more than MAX_INT8_SCORE_DROP says by how much.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace

__all__ = ["check_int8", "check_request", "check_agreement", "export_onnx", "ExportResult",
           "failing_layer", "FORMATS", "MAX_INT8_SCORE_DROP", "onnx_session", "OPSET", "Parity",
           "parity", "QUANTIZATIONS", "quantize_int8", "register_export", "run_model_file",
           "run_onnx", "save_torchscript", "write_folder"]

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
MAX_INT8_SCORE_DROP = 0.005  # 0.5 points of accuracy (or of R²)
# The TorchScript-based ONNX exporter: it needs no onnxscript, and takes the uint8 input and
# the dynamic batch dimension as given. torch's newer exporter (dynamo=True) needs onnxscript.
OPSET = 17


@dataclass(frozen=True)
class Parity:
    """An exported model against the PyTorch model it came from, on the same inputs."""

    samples: int
    max_abs_diff: float  # of any output (a probability, a prediction)
    agreement: float  # share of inputs answered alike: the same top class, or the same value
    metric: str  # the score of both on the inputs' labels: accuracy, or r2 for numbers
    score_torch: float
    score_exported: float


@dataclass(frozen=True)
class ExportResult:
    """What `mlsd export` wrote, how it compares with the PyTorch model, and where MLflow
    keeps it (None for a checkpoint folder, which has no version)."""

    format: str
    quantize: str | None
    out: str
    model_file: str
    metadata_file: str
    size_bytes: int
    parity: Parity
    fp32_size_bytes: int | None = None
    registered: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        p = self.parity
        size = f"{self.size_bytes / 1024:.1f} KiB"
        if self.fp32_size_bytes:
            size += f" ({self.size_bytes / self.fp32_size_bytes:.2f}x the fp32 model)"
        lines = [f"{self.format}{' ' + self.quantize if self.quantize else ''}: "
                 f"{self.model_file} ({size})",
                 f"metadata: {self.metadata_file}",
                 f"parity on {p.samples} test inputs: agreement {p.agreement:.4f}, "
                 f"max |difference| {p.max_abs_diff:.2e}, {p.metric} "
                 f"{p.score_exported:.4f} (PyTorch {p.score_torch:.4f})"]
        if self.registered:
            lines.append(f"registered beside the version: {self.registered}")
        return "\n".join(lines)


def check_request(fmt: str, quantize: str | None) -> None:
    """InputError for a format or quantisation we do not write."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"--quantize {quantize!r}: choose {', '.join(QUANTIZATIONS)}")
    if quantize and fmt != "onnx":
        raise InputError("--quantize int8 writes ONNX (ONNX Runtime's quantiser): use "
                         "--format onnx")


def parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray) -> Parity:
    """Compare probabilities (N×K) of the PyTorch model and the export on labelled inputs:
    the same top class, and the accuracy of both."""
    return Parity(samples=len(labels),
                  max_abs_diff=float(np.abs(reference - exported).max()),
                  agreement=float((reference.argmax(1) == exported.argmax(1)).mean()),
                  metric="accuracy",
                  score_torch=float((reference.argmax(1) == labels).mean()),
                  score_exported=float((exported.argmax(1) == labels).mean()))


def value_parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray,
                 tolerance: float = 1e-3) -> Parity:
    """Compare predicted values (N, or N×1) on labelled inputs: the share within `tolerance`
    (relative to the values' scale), and the R² of both."""
    reference, exported = reference.reshape(len(labels)), exported.reshape(len(labels))
    scale = max(1.0, float(np.abs(reference).max()))

    def r2(predicted: np.ndarray) -> float:
        return float(1 - ((labels - predicted) ** 2).sum() / ((labels - labels.mean()) ** 2).sum())

    return Parity(samples=len(labels), max_abs_diff=float(np.abs(reference - exported).max()),
                  agreement=float((np.abs(reference - exported) <= tolerance * scale).mean()),
                  metric="r2", score_torch=r2(reference), score_exported=r2(exported))


def export_onnx(module, example, path: str | Path, input_name: str, output_name: str) -> None:
    """Write `module` (in eval mode) as ONNX with a variable batch dimension; InputError naming
    the layer that does not export."""
    import torch

    try:
        with torch.inference_mode():
            _onnx(module, example, path, input_name, output_name)
    except Exception as exc:
        layer = failing_layer(module, example)
        where = f"layer {layer!r}" if layer else "the model"
        raise InputError(f"{where} does not export to ONNX: "
                         f"{str(exc).strip().splitlines()[0][:300]}") from exc


def _onnx(module, example, path, input_name: str, output_name: str) -> None:
    import torch

    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


def failing_layer(module, example) -> str | None:
    """The first leaf layer (by its name in the model) that does not export on its own, fed
    what it receives in a forward pass of `example`; None if each one does."""
    import torch

    inputs: dict[str, tuple] = {}

    def keep_input(name: str):
        def hook(layer, args, output) -> None:  # returning anything would replace the output
            inputs.setdefault(name, args)
        return hook

    hooks = [layer.register_forward_hook(keep_input(name))
             for name, layer in module.named_modules() if name and not list(layer.children())]
    try:
        with torch.inference_mode():
            module(example)
    except Exception:
        pass  # the layers reached before the failure still say what they received
    finally:
        for hook in hooks:
            hook.remove()
    layers = dict(module.named_modules())
    for name, args in inputs.items():
        with tempfile.TemporaryDirectory() as scratch:
            try:
                torch.onnx.export(layers[name], args, os.path.join(scratch, "layer.onnx"),
                                  dynamo=False, opset_version=OPSET)
            except Exception:
                return name
    return None


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """The session's single output for `inputs`, in batches."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0]
                           for i in range(0, len(inputs), batch)])


def save_torchscript(module, example, path: str | Path) -> None:
    """`module` (in eval mode) traced on `example` and saved as TorchScript."""
    import torch

    with torch.inference_mode():
        traced = torch.jit.trace(module, example)
    traced.save(str(path))


def run_model_file(path: str | Path, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """An exported model's single output for `inputs`, in batches: ONNX Runtime for a .onnx
    file, libtorch for TorchScript."""
    if str(path).endswith(".onnx"):
        return run_onnx(onnx_session(path), inputs, batch)
    import torch

    module = torch.jit.load(str(path))
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(np.ascontiguousarray(
            inputs[i:i + batch]))).numpy() for i in range(0, len(inputs), batch)])


def check_agreement(checked: Parity, fmt: str, inputs: str) -> None:
    """InputError when the fp32 export answers any input otherwise than PyTorch (another top
    class, or a value beyond the tolerance)."""
    if checked.agreement < 1.0:
        raise InputError(f"the {fmt} model answers otherwise than PyTorch (another class, or "
                         f"another value) on {round((1 - checked.agreement) * checked.samples)} "
                         f"of {checked.samples} test {inputs}: nothing written")


def quantize_int8(fp32: str | Path, int8: str | Path,
                  calibration: Iterable[np.ndarray], input_name: str) -> None:
    """ONNX Runtime's static int8 quantisation (QDQ, per-channel weights), its activation
    ranges calibrated on `calibration` batches (training inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    quantize_static(str(fp32), str(int8), Batches(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)


def check_int8(quantized: Parity) -> None:
    """InputError when the int8 model's score drops by more than MAX_INT8_SCORE_DROP."""
    drop = quantized.score_torch - quantized.score_exported
    if drop > MAX_INT8_SCORE_DROP:
        raise InputError(f"int8 quantisation loses {100 * drop:.2f} points of "
                         f"{quantized.metric} on the test split ({quantized.score_torch:.4f} "
                         f"-> {quantized.score_exported:.4f}; at most "
                         f"{100 * MAX_INT8_SCORE_DROP:.1f} allowed): nothing written")


def write_folder(out: str | Path, files: dict[str, Callable[[Path], object]]) -> Path:
    """Write each file (name -> a function that writes it at the path given) into a scratch
    folder, then move them all into `out`: a failure leaves `out` as it was."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as scratch:
        for name, write in files.items():
            write(Path(scratch) / name)
        for name in files:
            shutil.move(os.path.join(scratch, name), out / name)
    return out


def register_export(model_uri: str, out: str | Path, fmt: str, workspace: Workspace) -> str | None:
    """Log the export folder into the MLflow run of the version `model_uri` names (under
    export/<fmt>) and tag the version with where it is; None for a checkpoint folder."""
    if not model_uri.startswith("models:/"):
        return None
    from mlsd_ray.registry import client, show

    version = show(model_uri, workspace)
    mlflow_client = client(workspace)
    artifact_path = f"export/{fmt}"
    mlflow_client.log_artifacts(version.run_id, str(out), artifact_path)
    location = f"runs:/{version.run_id}/{artifact_path}"
    mlflow_client.set_model_version_tag(version.name, str(version.version), f"export_{fmt}",
                                        location)
    return location
