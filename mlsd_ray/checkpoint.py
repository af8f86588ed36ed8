"""Checkpoint = everything needed to predict, and nothing that needs unpickling.

    model.pt            state_dict, loaded with weights_only=True
    model.json          model name and the shape it was built for
    preprocessing.json  image size, channels, train mean/std, class names
    reference.json      statistics of the training inputs (for drift checks)
    metadata.json       run name, dataset path and fingerprint, the resolved config
    train_state.pt      optimizer/scheduler state, epoch, history (for resuming)
    decision.json       tabular models only: the decision threshold and how it was chosen
    checksums.json      sha256 of every file above; loading refuses a mismatch
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlsd_ray.data.transforms import Preprocessor
from mlsd_ray.errors import InputError
from mlsd_ray.models import build_model

MODEL_FILES = ("model.pt", "model.json", "preprocessing.json", "reference.json",
               "metadata.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(directory: str | Path, model: nn.Module, model_config: dict,
                    preprocessing: dict, reference: dict, metadata: dict,
                    train_state: dict, extra: dict[str, dict] | None = None) -> None:
    """Write a checkpoint directory (see the module docstring); `extra` adds JSON files by
    name (a tabular model's decision.json), covered by the checksums too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), directory / "model.pt")
    (directory / "model.json").write_text(json.dumps(model_config, indent=2))
    (directory / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
    (directory / "reference.json").write_text(json.dumps(reference, indent=2))
    (directory / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.save(train_state, directory / "train_state.pt")
    for name, content in (extra or {}).items():
        (directory / name).write_text(json.dumps(content, indent=2))
    names = [*MODEL_FILES, "train_state.pt", *(extra or {})]
    (directory / "checksums.json").write_text(
        json.dumps({name: _sha256(directory / name) for name in names}, indent=2))


def verify(directory: str | Path) -> None:
    """InputError when a file is missing or differs from its recorded checksum."""
    directory = Path(directory)
    try:
        recorded = json.loads((directory / "checksums.json").read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{directory} is not a mlsd-ray checkpoint (no checksums.json)") from exc
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise InputError(f"checkpoint file missing: {path}")
        if _sha256(path) != digest:
            raise InputError(f"checkpoint file {path} does not match its checksum: "
                             "it was changed or damaged after training")


@dataclass
class LoadedModel:
    """A model ready for inference, with the preprocessing it was trained with."""

    model: nn.Module
    preprocessor: Preprocessor
    model_config: dict
    reference: dict
    metadata: dict


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
    reference = json.loads((directory / "reference.json").read_text())
    metadata = json.loads((directory / "metadata.json").read_text())
    return LoadedModel(model, preprocessor, model_config, reference, metadata)


def load_train_state(directory: str | Path) -> dict:
    """Optimizer/scheduler state, epoch and history, for resuming."""
    verify(directory)
    return torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=True)
