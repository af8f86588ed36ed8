"""Checkpoint = everything needed to predict, and nothing that needs unpickling. Every task
writes this format (a task's loader, such as tasks/image/checkpoint.py, reads it back):

    model.pt            state_dict, loaded with weights_only=True
    model.json          model name and the shape it was built for
    preprocessing.json  what turns an input into the model's (images: size, channels, train
                        mean/std, class names; tables: the fitted column preparation)
    reference.json      statistics of the training inputs (for drift checks)
    metadata.json       run name, dataset path and fingerprint, the resolved config
    train_state.pt      optimizer/scheduler state, epoch, history (for resuming)
    decision.json       tabular models only: the decision threshold and how it was chosen
    checksums.json      sha256 of every file above; loading refuses a mismatch
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mlsd_ray.core.contracts import DRIFT_REFERENCE
from mlsd_ray.core.errors import InputError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_train_state", "MODEL_FILES", "RANK_METRIC", "save_checkpoint", "unwrap", "verify"]

# torch is imported where a checkpoint is written or its train state read: the registry and
# `mlsd` commands import this module, and a bad-usage error should not wait ~2 s for torch.

# Checkpoints are kept, and runs and trials ranked, by the task's validation score (e.g. val
# accuracy) with ties broken by val loss: on small val splits many epochs reach the same
# accuracy (often 1.0), and the lowest loss among them generalises best. The loss term
# (1e-4 × loss) is far below one val sample's share of accuracy. (Here, not in loop.py, so
# that Tune's driver need not import torch.)
RANK_METRIC = "val_rank_score"

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
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), directory / "model.pt")
    (directory / "model.json").write_text(json.dumps(model_config, indent=2))
    (directory / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
    (directory / "reference.json").write_text(json.dumps(DRIFT_REFERENCE.stamp(reference),
                                                         indent=2))
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


def load_train_state(directory: str | Path) -> dict:
    """Optimizer/scheduler state, epoch and history, for resuming."""
    import torch

    verify(directory)
    return torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=True)
