"""One epoch of training and one pass of evaluation over plain iterables of batches.

No Ray here: the shared training loop (training/loop.py, through train.py's ImageEpochs) feeds
these functions its dataset shard, and the unit tests feed them lists. A batch is a dict with
`image` (uint8 N×H×W×C) and `label` (int).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlsd_ray.tasks.image.data.transforms import Augmenter, Preprocessor
from mlsd_ray.training.loop import NonFiniteLossError


@dataclass
class PassResult:
    """Mean loss and accuracy of one pass, plus predictions (and their confidence) when asked."""

    loss: float
    accuracy: float
    samples: int
    predictions: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


@dataclass
class Step:
    """How each batch becomes model input: fitted preprocessing, device, memory format, AMP."""

    preprocessor: Preprocessor
    device: torch.device
    augmenter: Augmenter | None = None
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None

    def inputs(self, batch: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessor(np.asarray(batch["image"]), self.augmenter if train else None)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.tensor(np.asarray(batch["label"]), dtype=torch.long, device=self.device)
        return x, y

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)


def train_one_epoch(model: nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                    step: Step, scheduler=None, label_smoothing: float = 0.0,
                    scaler: torch.amp.GradScaler | None = None) -> PassResult:
    """Train over `batches` once; the scheduler (if any) steps per batch."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in batches:
        x, y = step.inputs(batch, train=True)
        with step.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return PassResult(total_loss / max(seen, 1), correct / max(seen, 1), seen)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], step: Step,
             keep_predictions: bool = False) -> PassResult:
    """Loss and accuracy over `batches` without gradients (and the predictions if asked)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    predictions, labels, confidences = [], [], []
    for batch in batches:
        x, y = step.inputs(batch, train=False)
        with step.autocast():
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        predicted = logits.argmax(1)
        correct += (predicted == y).sum().item()
        seen += len(y)
        if keep_predictions:
            predictions.extend(predicted.tolist())
            labels.extend(y.tolist())
            confidences.extend(torch.softmax(logits, dim=1).amax(dim=1).tolist())
    return PassResult(total_loss / max(seen, 1), correct / max(seen, 1), seen, predictions,
                      labels, confidences)
