"""`mlsd export` for a parts task: the network on encoded inputs as ONNX (optionally int8) or
TorchScript, with export.json (the codec's fitted state, the input columns, the tensor names),
checked on the test split against PyTorch before anything is written.

The exported graph takes what the codec's `encode` makes and gives what its `decode` reads:
the codec's state in export.json is what a runtime outside Python needs to do both.
Parity compares the decoded predictions: the same class for a task with outcomes, else the
same value within 1e-3 of the values' scale, and the model part's metric on both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from mlsd_ray import export
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.data import PreparedRows
from mlsd_ray.stages.model import LoadedModel

__all__ = ["export_model", "prediction_parity"]

INPUT, OUTPUT = "input", "output"
VALUE_TOLERANCE = 1e-3


def prediction_parity(loaded: LoadedModel, reference: np.ndarray, exported: np.ndarray,
                      truth: np.ndarray) -> export.Parity:
    """Decoded predictions of PyTorch and the export on the same rows (see the docstring)."""
    codec, state = loaded.parts.codec, loaded.state
    ours, theirs = codec.decode(reference, state), codec.decode(exported, state)
    metric = loaded.parts.model.metric
    if codec.outcome(ours[0]) is not None:
        same = np.asarray(ours) == np.asarray(theirs)
    else:
        scale = max(1.0, float(np.abs(np.asarray(ours, float)).max()))
        same = np.abs(np.asarray(ours, float) - np.asarray(theirs, float)) \
            <= VALUE_TOLERANCE * scale
    return export.Parity(samples=len(truth),
                         max_abs_diff=float(np.abs(reference - exported).max()),
                         agreement=float(np.mean(same)), metric=metric,
                         score_torch=float(loaded.parts.model.scores(ours, truth)[metric]),
                         score_exported=float(loaded.parts.model.scores(theirs, truth)[metric]))


def export_model(loaded: LoadedModel, fmt: str, quantize: str | None, out: str,
                 model_uri: str, workspace: Workspace) -> export.ExportResult:
    """Write the model as `fmt` with export.json into `out`, checked on its test split, and
    register it beside `model_uri`. Nothing is written when a check fails."""
    import torch

    export.check_request(fmt, quantize)
    prepared = PreparedRows.open(loaded.metadata.dataset.path)
    test = prepared.load_split("test")
    inputs = loaded.parts.codec.encode(test, loaded.state)
    truth = test[loaded.parts.data.target].to_numpy()
    reference = loaded.outputs(inputs)
    example = torch.from_numpy(np.ascontiguousarray(inputs[:2]))
    with tempfile.TemporaryDirectory(prefix="mlsd-export-") as scratch:
        fp32 = Path(scratch) / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
        if fmt == "onnx":
            with warnings.catch_warnings():
                # torch warns that a recurrent layer exported with a batch of 2 may fail on
                # other batch sizes; the parity check below runs the whole test split in
                # batches of 256 and refuses the export if any answer differs.
                warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a "
                                                          "batch_size other than 1")
                export.export_onnx(loaded.module, example, fp32, INPUT, OUTPUT)
        else:
            export.save_torchscript(loaded.module, example, fp32)
        checked = prediction_parity(loaded, reference, export.run_model_file(fp32, inputs),
                                    truth)
        export.check_agreement(checked, fmt, "rows")
        built, fp32_size = fp32, None
        if quantize:
            built = Path(scratch) / "model.int8.onnx"
            train = loaded.parts.codec.encode(prepared.load_split("train"), loaded.state)
            export.quantize_int8(fp32, built, (train[i:i + 64] for i in range(0, 512, 64)),
                                 INPUT)
            checked = prediction_parity(loaded, reference, export.run_model_file(built, inputs),
                                        truth)
            export.check_int8(checked)
            fp32_size = fp32.stat().st_size
        described = {"format": fmt, "quantize": quantize, "model_file": built.name,
                     "model_uri": model_uri, "task": loaded.metadata.task,
                     "input": {"name": INPUT, "shape": [-1, *inputs.shape[1:]],
                               "dtype": "float32", "columns": loaded.columns},
                     "output": {"name": OUTPUT}, "codec_state": loaded.state,
                     "parity": {"samples": checked.samples, "agreement": checked.agreement,
                                "max_abs_diff": checked.max_abs_diff}}
        export.write_folder(out, {
            built.name: lambda path: shutil.copyfile(built, path),
            "export.json": lambda path: path.write_text(json.dumps(described, indent=2))})
    model_file = Path(out) / built.name
    return export.ExportResult(format=fmt, quantize=quantize, out=str(out),
                               model_file=str(model_file),
                               metadata_file=str(Path(out) / "export.json"),
                               size_bytes=model_file.stat().st_size, parity=checked,
                               fp32_size_bytes=fp32_size,
                               registered=export.register_export(model_uri, out, fmt,
                                                                 workspace))
