import numpy as np
import torch

from mlsd_ray.tasks.image.config import AugmentConfig
from mlsd_ray.tasks.image.data.transforms import (
    Augmenter,
    Preprocessor,
    channel_moments,
    moments_to_mean_std,
    resize,
    standardize,
    to_channels,
)


def test_channel_conversion():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    gray = to_channels(rgb, 1)
    assert gray.shape == (4, 4, 1) and gray[0, 0, 0] == 76  # 0.299 * 255
    assert to_channels(gray, 3).shape == (4, 4, 3)
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert to_channels(rgba, 3).shape == (4, 4, 3)
    assert to_channels(np.zeros((4, 4), np.uint8), 1).shape == (4, 4, 1)


def test_resize_and_standardize():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert resize(image, 8).shape == (8, 8, 3)
    assert resize(image[:, :, :1], 8).shape == (8, 8, 1)
    assert standardize(image, 16, 1).shape == (16, 16, 1)
    flat = np.full((10, 10, 1), 77, np.uint8)
    assert (resize(flat, 5) == 77).all()


def test_moments_give_mean_and_std():
    images = np.random.default_rng(0).integers(0, 255, (50, 6, 6, 3), dtype=np.uint8)
    m = channel_moments(images)
    mean, std = moments_to_mean_std(float(m["count"]), m["sum"], m["sumsq"])
    scaled = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, scaled.mean(0)) and np.allclose(std, scaled.std(0))


def test_preprocessor_normalizes_with_fitted_state():
    images = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
    m = channel_moments(images)
    mean, std = moments_to_mean_std(float(m["count"]), m["sum"], m["sumsq"])
    pre = Preprocessor(8, 1, mean, std, ["a"])
    out = pre(images)
    assert out.shape == (64, 1, 8, 8) and out.dtype == torch.float32
    assert abs(out.mean().item()) < 1e-4 and abs(out.std().item() - 1) < 1e-2
    assert Preprocessor.from_dict(pre.to_dict()) == pre


def test_preprocessor_standardizes_other_sizes_like_serving():
    pre = Preprocessor(8, 3, [0.5] * 3, [0.25] * 3)
    raw = [np.zeros((20, 20), np.uint8), np.zeros((9, 7, 3), np.uint8)]
    assert pre(raw).shape == (2, 3, 8, 8)


def test_augmenter_is_per_sample_and_keeps_range():
    torch.manual_seed(0)
    cfg = AugmentConfig(random_shift=2, hflip=True, rotation_deg=20, brightness=0.3, contrast=0.3)
    image = torch.rand(1, 3, 16, 16)
    batch = image.repeat(8, 1, 1, 1)
    out = Augmenter(cfg, 16)(batch)
    assert out.shape == batch.shape
    assert out.min() >= 0 and out.max() <= 1
    # identical inputs, different random parameters per sample
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out, batch)


def test_augmenter_off_is_identity():
    cfg = AugmentConfig(random_shift=0, hflip=False, rotation_deg=0, brightness=0, contrast=0)
    batch = torch.rand(4, 1, 8, 8)
    assert torch.equal(Augmenter(cfg, 8)(batch), batch)
