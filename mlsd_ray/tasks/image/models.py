"""Models by name: a small decorator registry instead of if/elif chains.

Every builder takes the input shape (channels, image size) and the number of classes, so a
checkpoint's model config (name + those numbers) is enough to rebuild the network.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mlsd_ray.core.errors import InputError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: make a builder available as `model.name: NAME`."""

    def wrap(builder):
        MODELS[name] = builder
        return builder

    return wrap


def build_model(name: str, in_channels: int, image_size: int, num_classes: int,
                dropout: float = 0.0) -> nn.Module:
    """Build a registered model; InputError naming the choices for an unknown name."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, image_size=image_size,
                        num_classes=num_classes, dropout=dropout)


@register_model("seed_cnn")
def seed_cnn(in_channels: int, image_size: int, num_classes: int,
             dropout: float = 0.0) -> nn.Module:
    """conv 64, ReLU, max-pool, conv 128, ReLU, max-pool, linear 128, ReLU, linear to logits."""
    side = image_size // 4
    if side < 1:
        raise InputError(f"seed_cnn needs images of at least 4×4 pixels, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * side * side, 128), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(128, num_classes))


@register_model("resnet18")
def resnet18(in_channels: int, image_size: int, num_classes: int,
             dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet-18 (random init) with a stem for small images: 3×3 stride-1, no pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model


@register_model("resnet18_imagenet")
def resnet18_imagenet(in_channels: int, image_size: int, num_classes: int,
                      dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet-18 (random init) with its standard ImageNet stem (7×7 stride-2 conv
    and a max-pool): 16× fewer activations than `resnet18` after the stem, so it suits images
    of 64 pixels and more, and its forward pass gains from batching on CPU."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model
