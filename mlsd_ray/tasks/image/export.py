"""The image task's `mlsd export`: the served computation as one graph.

The graph takes what the Open Inference Protocol's image input takes, uint8 N×H×W×C at the
trained size, and returns the class probabilities: scaling to [0, 1], the training mean and
std, the network and the softmax are inside it. Resizing to the trained size stays outside
(PIL's antialiased bilinear, `data/transforms.py:resize`); the metadata JSON says so.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlsd_ray import export
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.export import ExportResult
from mlsd_ray.tasks.image.checkpoint import LoadedModel, load_model
from mlsd_ray.tasks.image.data.prepare import PreparedDataset

INPUT, OUTPUT = "images", "probabilities"
CALIBRATION_IMAGES = 512  # training images that set the int8 activation ranges


class NormalizedClassifier(nn.Module):
    """Pixels in [0, 1], N×C×H×W at the trained size -> class probabilities: the part of
    the served computation after decoding, which a Serve replica runs (serve.runtime)."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.model = loaded.model
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(loaded.preprocessor.mean).view(shape))
        self.register_buffer("std", torch.tensor(loaded.preprocessor.std).view(shape))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The class scores before the softmax."""
        return self.model(self.normalize(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixels), dim=1)


class ServedClassifier(nn.Module):
    """uint8 images N×H×W×C at the trained size -> class probabilities N×K: what the Serve app
    computes for them after decoding and resizing."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.classifier = NormalizedClassifier(loaded)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.permute(0, 3, 1, 2).float() / 255.0)


def onnx_runtime_probabilities(loaded: LoadedModel,
                               threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    """`loaded.probabilities` run by ONNX Runtime: the network exported once (here, to a
    temporary file) and a session with `threads` threads."""
    pre = loaded.preprocessor
    example = torch.zeros(2, pre.channels, pre.image_size, pre.image_size)
    with tempfile.TemporaryDirectory(prefix="mlsd-replica-") as scratch:
        path = Path(scratch) / "model.onnx"
        export.export_onnx(NormalizedClassifier(loaded).eval(), example, path, "pixels", OUTPUT)
        session = export.onnx_session(path, threads=threads)

    def probabilities(pixels: torch.Tensor) -> np.ndarray:
        return session.run(None, {"pixels": pixels.numpy()})[0]

    return probabilities


def export_image_model(checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
                       model_uri: str, workspace: Workspace) -> ExportResult:
    """Write the model in `checkpoint_dir` as `fmt` (int8 if asked) with metadata.json into
    `out`, checked on its dataset's test split, and register it beside `model_uri`. Nothing
    is written when a check fails."""
    export.check_request(fmt, quantize)
    loaded = load_model(checkpoint_dir)
    dataset = PreparedDataset.open(loaded.metadata.dataset.path)
    images, labels = dataset.load_split("test")
    reference = loaded.predict(images)
    with tempfile.TemporaryDirectory(prefix="mlsd-export-") as scratch:
        built, fp32_size = _build(ServedClassifier(loaded).eval(), fmt, quantize, dataset,
                                  Path(scratch), images[:2])
        checked = export.parity(reference, export.run_model_file(built, images), labels)
        if quantize:
            export.check_int8(checked)
        else:
            export.check_agreement(checked, fmt, "images")
        metadata = _metadata(loaded, fmt, quantize, built.name, model_uri, checked)
        export.write_folder(out, {
            built.name: lambda path: shutil.copyfile(built, path),
            "metadata.json": lambda path: path.write_text(json.dumps(metadata, indent=2))})
    kind = f"onnx-{quantize}" if quantize else fmt
    return ExportResult(format=fmt, quantize=quantize, out=str(out),
                        model_file=str(Path(out) / built.name),
                        metadata_file=str(Path(out) / "metadata.json"),
                        size_bytes=(Path(out) / built.name).stat().st_size, parity=checked,
                        fp32_size_bytes=fp32_size,
                        registered=export.register_export(model_uri, out, kind, workspace))


def _build(served: ServedClassifier, fmt: str, quantize: str | None,
           dataset: PreparedDataset, scratch: Path,
           sample: np.ndarray) -> tuple[Path, int | None]:
    """The model file in `scratch`, and the fp32 ONNX model's size when it was quantised."""
    example = torch.from_numpy(np.ascontiguousarray(sample))
    if fmt == "torchscript":
        export.save_torchscript(served, example, scratch / "model.torchscript.pt")
        return scratch / "model.torchscript.pt", None
    fp32 = scratch / "model.onnx"
    export.export_onnx(served, example, fp32, INPUT, OUTPUT)
    if not quantize:
        return fp32, None
    train_images, _ = dataset.load_split("train")
    calibration = [train_images[i:i + 64]
                   for i in range(0, min(len(train_images), CALIBRATION_IMAGES), 64)]
    int8 = scratch / "model.int8.onnx"
    export.quantize_int8(fp32, int8, calibration, INPUT)
    return int8, fp32.stat().st_size


def _metadata(loaded: LoadedModel, fmt: str, quantize: str | None, model_file: str,
              model_uri: str, checked: export.Parity) -> dict:
    """What a program needs besides the model file to give the served answer."""
    pre = loaded.preprocessor
    return {
        "task": "image", "format": fmt, "quantize": quantize, "model_file": model_file,
        "model_uri": model_uri, "model_name": loaded.model_config.get("name"),
        "input": {"name": INPUT, "datatype": "UINT8",
                  "shape": [-1, pre.image_size, pre.image_size, pre.channels]},
        "output": {"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(pre.class_names)]},
        "class_names": pre.class_names,
        "preprocessing": {
            "outside_the_model": f"convert to {pre.channels} channel(s) (grey: ITU-R 601 luma), "
                                 f"resize to {pre.image_size}x{pre.image_size} with PIL's "
                                 "bilinear resampling",
            "inside_the_model": "pixels / 255, minus mean, divided by std, per channel; "
                                "softmax over the classes",
            "image_size": pre.image_size, "channels": pre.channels,
            "mean": pre.mean, "std": pre.std},
        "parity": checked.__dict__,
    }
