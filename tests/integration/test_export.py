"""`mlsd export` as a user runs it, on the session's small digits model registered in MLflow:
ONNX, int8 ONNX and TorchScript, each checked against the served answers; docs/export.md's
snippet run as written, with onnxruntime and numpy only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.image.checkpoint import load_model
from tests.conftest import run_mlsd

DOCS = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def test_onnx_gives_the_served_answers_and_is_registered_beside_the_version(
        digits_registered, digits_model, tmp_path):
    out = tmp_path / "export"
    result = run_mlsd("export", "--model", "models:/digits-cnn/1", "--out", str(out), "--json",
                  "--home", digits_registered)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    parity = exported["parity"]
    print("\nonnx:", parity, exported["size_bytes"])
    assert parity["agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    assert parity["samples"] == len(digits_model.dataset.load_split("test")[1])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["input"] == {"name": "images", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert exported["registered"].endswith("/export/onnx")

    # docs/export.md's snippet, as written, in a process that imports neither torch nor mlsd
    snippet = re.search(r"## Reproduce a served answer.*?```python\n(.*?)```", DOCS.read_text(),
                        re.S).group(1)
    images, _ = digits_model.dataset.load_split("test")
    np.save(tmp_path / "images.npy", images[:20])
    ran = subprocess.run([sys.executable, "-c", "import sys\n" + snippet +
                          "\nassert 'torch' not in sys.modules and 'mlsd_ray' not in sys.modules"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert ran.returncode == 0, ran.stderr
    served = load_model(digits_model.result.checkpoint).predict(images[:20])
    assert [line.split()[0] for line in ran.stdout.splitlines()] == [
        meta["class_names"][i] for i in served.argmax(1)]

    from mlflow import MlflowClient

    from mlsd_ray import registry

    workspace = Workspace.at(digits_registered)
    registry.client(workspace)
    run_id = registry.show("models:/digits-cnn/1", workspace).run_id
    logged = {item.path for item in MlflowClient().list_artifacts(run_id, "export/onnx")}
    assert logged == {"export/onnx/model.onnx", "export/onnx/metadata.json"}
    assert registry.show("models:/digits-cnn/1", workspace).tags["export_onnx"] == \
        exported["registered"]


def test_int8_and_torchscript(digits_registered, digits_model, tmp_path):
    """int8: smaller, within 0.5 points of accuracy (or refused, saying by how much);
    TorchScript: the same top class for every test image."""
    int8 = run_mlsd("export", "--model", "models:/digits-cnn/1", "--out", str(tmp_path / "int8"),
                "--quantize", "int8", "--json", "--home", digits_registered)
    if int8.returncode == 2:  # the refusal the issue asks for: it names the loss
        assert "points of accuracy" in int8.stderr and not (tmp_path / "int8").exists()
    else:
        assert int8.returncode == 0, int8.stderr
        quantized = json.loads(int8.stdout)
        print("\nint8:", quantized["parity"], quantized["size_bytes"],
              quantized["fp32_size_bytes"])
        p = quantized["parity"]
        assert p["metric"] == "accuracy" and p["score_torch"] - p["score_exported"] <= 0.005
        assert quantized["size_bytes"] < quantized["fp32_size_bytes"]
    script = run_mlsd("export", "--model", digits_model.result.checkpoint, "--format",
                  "torchscript", "--out", str(tmp_path / "ts"), "--json", "--home",
                  digits_registered)
    assert script.returncode == 0, script.stderr
    traced = json.loads(script.stdout)
    assert traced["parity"]["agreement"] == 1.0 and traced["registered"] is None
    assert (tmp_path / "ts" / "model.torchscript.pt").is_file()
    refused = run_mlsd("export", "--model", "models:/digits-cnn/1", "--format", "tflite",
                   "--out", str(tmp_path / "x"), "--home", digits_registered)
    assert refused.returncode == 2 and "choose onnx or torchscript" in refused.stderr
