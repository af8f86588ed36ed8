"""The image task's own config sections: `data` (sources, validation, resizing, splits,
augmentation) and `model` (the network). `ImageConfig` is the whole config of an image run:
the shared sections of `mlsd_ray.core.config.Config` plus these two."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlsd_ray.core.config import Config, SplitConfig, StrictModel

__all__ = ["AugmentConfig", "DataConfig", "ImageConfig", "ModelConfig", "SyntheticConfig"]


class AugmentConfig(StrictModel):
    """Training-time augmentation, drawn per sample by `transforms.Augmenter` (not at data prep)."""

    random_shift: int = Field(2, ge=0, description="Pad by N pixels, then random-crop back "
                              "(2 on the 16×16 digits = 1 pixel of the 8×8 originals).")
    hflip: bool = Field(False, description="Random horizontal flip; keep off for digits and text.")
    rotation_deg: float = Field(0.0, ge=0, le=180, description="Random rotation in [-deg, deg].")
    brightness: float = Field(0.0, ge=0, description="Colour jitter: brightness factor spread.")
    contrast: float = Field(0.0, ge=0, description="Colour jitter: contrast factor spread.")


class SyntheticConfig(StrictModel):
    """Shape of the `synthetic[:N]` source: class-specific patterns plus noise (learnable)."""

    num_classes: int = Field(10, ge=2)
    image_size: int = Field(32, ge=4)
    channels: Literal[1, 3] = 3
    noise: float = Field(0.25, ge=0, le=1)


class DataConfig(SplitConfig):
    """The data stage: where images come from and how they are validated, resized and split."""

    source: str = Field("digits", description="digits | folder:PATH | parquet:PATH | "
                        "torchvision:NAME[:ROOT] | synthetic[:N]")
    name: str | None = Field(None, description="Dataset name under $MLSD_HOME/datasets/ "
                             "(default: derived from the source).")
    image_size: int | None = Field(None, ge=2, le=4096, description="Output side in pixels "
                                   "(default: the source's natural size; 32 for folder/parquet).")
    channels: Literal[1, 3] | None = Field(None, description="1 (grayscale) or 3 (RGB); "
                                           "default: the source's.")
    class_names: list[str] | None = Field(None, description="Known classes; labels outside "
                                          "them are quarantined as unknown_label.")
    image_column: str = Field("image", description="parquet: column with encoded bytes or arrays.")
    label_column: str = Field("label", description="parquet: column with the label.")
    pixel_range: Literal["auto", "unit", "byte"] = Field(
        "auto", description="Float arrays: unit=[0,1], byte=[0,255], auto=decide per image.")
    min_side: int = Field(2, ge=1, description="Images with a side below this are quarantined.")
    rows_per_task: int = Field(1024, ge=1, description="Files or rows per Ray Data task.")
    torchvision_split: Literal["train", "test"] = "train"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class ModelConfig(StrictModel):
    """Which network to train (see mlsd_ray/tasks/image/models.py)."""

    name: str = Field("seed_cnn", description="seed_cnn | resnet18 (small-image stem) | "
                      "resnet18_imagenet (the standard stem, for images of 64 px and up)")
    dropout: float = Field(0.0, ge=0, lt=1)


class ImageConfig(Config):
    """An image run's config: the shared sections, `data` and `model`."""

    task: str = "image"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
