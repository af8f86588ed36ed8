"""Image transforms shared by the data stage, training and serving.

Prepared datasets store images as uint8 H×W×C at the configured size. Training and serving turn a
batch of those into float tensors with the same `Preprocessor` (whose fitted state travels in the
manifest and later in every checkpoint), and training adds `Augmenter` before normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mlsd_ray.tasks.image.config import AugmentConfig

if TYPE_CHECKING:  # torch is imported where tensors are made: data-stage workers never need it
    import torch

# ITU-R 601-2 luma, the same weights PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert a uint8 H×W or H×W×C (C in 1, 3, 4) image to H×W×`channels`."""
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have == 4:  # drop alpha
        image, have = image[:, :, :3], 3
    if have == channels:
        return image
    if channels == 1:
        gray = image.astype(np.float32) @ _LUMA
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    return np.repeat(image, channels, axis=2)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 H×W×C image to size×size (antialiased bilinear); no-op when already there."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    channels = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


def standardize(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Channel conversion then resize: the one path every source and the server take."""
    return resize(to_channels(image, channels), size)


def channel_moments(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel pixel count, sum and sum of squares of uint8 N×H×W×C images scaled to [0, 1]."""
    x = images.astype(np.float64) / 255.0
    flat = x.reshape(-1, x.shape[-1])
    return {"count": np.array(flat.shape[0]), "sum": flat.sum(0), "sumsq": (flat**2).sum(0)}


def moments_to_mean_std(count: float, total: np.ndarray, sumsq: np.ndarray) -> tuple[list, list]:
    """Mean and (population) std per channel from accumulated moments; std floored to avoid /0."""
    mean = total / count
    std = np.sqrt(np.maximum(sumsq / count - mean**2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


@dataclass
class Preprocessor:
    """Fitted preprocessing state: uint8 H×W×C images -> normalised float N×C×H×W tensors."""

    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> Preprocessor:
        return cls(**{k: state[k] for k in ("image_size", "channels", "mean", "std")},
                   class_names=list(state.get("class_names", [])))

    def to_tensor(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images (any size/channels) -> float N×C×H×W in [0, 1] at the fitted size."""
        import torch

        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (
                self.image_size, self.image_size, self.channels):
            images = np.stack([standardize(np.asarray(i), self.image_size, self.channels)
                               for i in images])
        array = np.ascontiguousarray(images)
        if not array.flags.writeable:  # Arrow-backed batches are read-only; torch wants to own
            array = array.copy()
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
        return tensor.float().div_(255.0)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Subtract the training mean and divide by the training std, per channel."""
        import torch

        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(1, -1, 1, 1)
        return (tensor - mean) / std

    def __call__(self, images, augmenter: Augmenter | None = None) -> torch.Tensor:
        tensor = self.to_tensor(images)
        if augmenter is not None:
            tensor = augmenter(tensor)
        return self.normalize(tensor)


class Augmenter:
    """Training-time augmentation with torchvision.transforms.v2, drawn per sample.

    v2 transforms given a whole N×C×H×W batch draw one set of random parameters for all of it,
    so each sample is transformed on its own. Randomness comes from torch's global RNG, which the
    training loop seeds.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int):
        from torchvision.transforms import v2

        steps = []
        if cfg.random_shift:
            steps.append(v2.RandomCrop(image_size, padding=cfg.random_shift))
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if cfg.rotation_deg:
            steps.append(v2.RandomRotation(cfg.rotation_deg))
        if cfg.brightness or cfg.contrast:
            steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Augment float [0, 1] N×C×H×W images; returns a new tensor of the same shape."""
        import torch

        if self.transform is None:
            return batch
        return torch.stack([self.transform(image) for image in batch]).clamp_(0.0, 1.0)
