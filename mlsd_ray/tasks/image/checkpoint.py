"""An image model back from its checkpoint (training/checkpoint.py): the CNN rebuilt from
model.json, its weights, and the preprocessing it was trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlsd_ray.core.contracts import DRIFT_REFERENCE, CheckpointMetadata
from mlsd_ray.tasks.image.data.transforms import Preprocessor
from mlsd_ray.tasks.image.models import build_model
from mlsd_ray.training.checkpoint import verify


@dataclass
class LoadedModel:
    """A model ready for inference, with the preprocessing it was trained with."""

    model: nn.Module
    preprocessor: Preprocessor
    model_config: dict
    reference: dict
    metadata: CheckpointMetadata

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, K) for images already at the trained size in [0, 1]
        (`preprocessor.to_tensor`): normalised as trained, one forward pass, softmax."""
        with torch.inference_mode():
            logits = self.model(self.preprocessor.normalize(pixels))
            return torch.softmax(logits.float(), dim=1).numpy()

    def predict(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Class probabilities for a batch of uint8 images (N×H×W×C, or a list of H×W(×C)
        of any size, resized as trained): what the Serve app answers for them and what the
        registered MLflow Model returns."""
        with torch.inference_mode():
            return self.probabilities(self.preprocessor.to_tensor(images))


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify checksums, rebuild the network from model.json and load its weights."""
    directory = Path(directory)
    verify(directory)
    model_config = json.loads((directory / "model.json").read_text())
    preprocessor = Preprocessor.from_dict(json.loads((directory / "preprocessing.json")
                                                     .read_text()))
    model = build_model(**model_config)
    state = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    reference = DRIFT_REFERENCE.read(str(directory / "reference.json"))
    return LoadedModel(model, preprocessor, model_config, reference,
                       CheckpointMetadata.read(directory))
