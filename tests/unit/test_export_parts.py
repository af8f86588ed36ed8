"""mlsd_ray/export without a trained model: the refusals and the layer that does not export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlsd_ray import export
from mlsd_ray.core.errors import InputError


class SingularValues(nn.Module):
    """A layer whose op has no ONNX form (aten::linalg_svdvals at opset 17)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.flatten(1).unsqueeze(1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.odd = SingularValues()
        self.head = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(torch.relu(self.conv(x))))


def test_a_layer_that_does_not_export_is_named(tmp_path):
    with pytest.raises(InputError, match="layer 'odd' does not export to ONNX: .*svdvals"):
        export.export_onnx(Net().eval(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx", "x", "y")
    assert not (tmp_path / "m.onnx").exists()


def test_an_exportable_model_writes_and_runs(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)).eval()
    export.export_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx", "x", "y")
    images = torch.rand(5, 1, 8, 8)
    got = export.run_onnx(export.onnx_session(tmp_path / "m.onnx"), images.numpy())
    with torch.inference_mode():
        assert got == pytest.approx(model(images).numpy(), abs=1e-5)  # batch 5, exported at 2


def test_int8_that_loses_too_much_says_by_how_much():
    lossy = export.Parity(samples=100, max_abs_diff=0.3, agreement=0.97, metric="accuracy",
                          score_torch=0.99, score_exported=0.98)
    with pytest.raises(InputError, match=r"loses 1\.00 points of accuracy .* at most 0\.5 "
                                         r"allowed\): nothing written"):
        export.check_int8(lossy)
    export.check_int8(export.Parity(100, 0.01, 1.0, "accuracy", 0.99, 0.986))  # 0.4: kept


def test_values_agree_within_their_scale_and_are_scored_by_r2():
    import numpy as np

    labels = np.array([1.0, 2.0, 3.0, 4.0])
    same = export.value_parity(labels + 0.1, labels + 0.1 + 1e-5, labels)
    assert same.agreement == 1.0 and same.metric == "r2" and same.score_torch < 1.0
    apart = export.value_parity(labels, labels + np.array([0, 0, 0, 0.5]), labels)
    assert apart.agreement == 0.75 and apart.score_torch == 1.0
    with pytest.raises(InputError, match="otherwise than PyTorch .* on 1 of 4 test rows"):
        export.check_agreement(apart, "onnx", "rows")


@pytest.mark.parametrize("fmt, quantize, message", [
    ("tflite", None, "choose onnx or torchscript"),
    ("onnx", "int4", "choose int8"),
    ("torchscript", "int8", "use --format onnx"),
])
def test_unknown_formats_are_refused(fmt, quantize, message):
    with pytest.raises(InputError, match=message):
        export.check_request(fmt, quantize)
