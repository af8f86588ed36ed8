"""`mlsd simulate-traffic`: send held-out images to a running app, with a controlled shift.

Images come from a split of the prepared dataset (the test split by default: data the model never
trained on), so unshifted traffic looks like the training data and each shift is the only change:

    none       as they are
    rotate     rotated by --amount degrees (default 30)
    noise      Gaussian noise with standard deviation --amount grey levels (default 40 of 255)
    invert     255 - pixel
    imbalance  --amount of the images (default 0.7) from the first class, the rest uniform

`--save DIR` also writes the sent images as DIR/<true class>/<n>.png: labelled new data, a
`folder:DIR` source for `mlsd retrain`.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mlsd_ray.core.errors import InputError
from mlsd_ray.monitor.traffic import Delivery, TrafficReport, deliver

SHIFTS = ("none", "rotate", "noise", "invert", "imbalance")
DEFAULT_AMOUNT = {"none": 0.0, "rotate": 30.0, "noise": 40.0, "invert": 0.0, "imbalance": 0.7}


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    rotated = np.asarray(pil.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0))
    return rotated[..., None] if squeeze else rotated


def choose(labels: np.ndarray, count: int, shift: str, amount: float,
           rng: np.random.Generator) -> np.ndarray:
    """Indices of the images to send: a random sample, or a skewed one for `imbalance`."""
    if shift != "imbalance":
        return rng.choice(len(labels), min(count, len(labels)), replace=False)
    if not 0 < amount <= 1:
        raise InputError(f"--amount for imbalance is a share in (0, 1], not {amount}")
    first = np.flatnonzero(labels == labels.min())
    heavy = int(round(amount * count))
    return np.concatenate([rng.choice(first, heavy, replace=True),
                           rng.choice(len(labels), count - heavy, replace=True)])


def shift_images(images: np.ndarray, shift: str, amount: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Apply one shift to uint8 N×H×W×C images."""
    if shift == "rotate":
        return np.stack([_rotate(image, amount) for image in images])
    if shift == "noise":
        noisy = images.astype(np.float32) + rng.normal(0.0, amount, images.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if shift == "invert":
        return 255 - images
    return images


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def save_folder(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                folder: str | Path, prefix: str) -> int:
    """DIR/<class>/<prefix>-<n>.png for each image; returns how many were written."""
    for n, (image, label) in enumerate(zip(images, labels)):
        path = Path(folder) / class_names[label] / f"{prefix}-{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
    return len(images)


def send(url: str, images: np.ndarray, batch: int,
         concurrency: int) -> tuple[Delivery, list[str | None]]:
    """POST the images as base64 PNGs, `batch` per request, `concurrency` requests at a time;
    the delivery and each image's predicted class name (None where its request failed)."""
    from mlsd_ray.serve.client import b64_instance

    chunks = [range(start, min(start + batch, len(images)))
              for start in range(0, len(images), batch)]
    bodies = [{"instances": [b64_instance(png_bytes(images[i])) for i in chunk]}
              for chunk in chunks]
    delivery, answers = deliver(f"{url.rstrip('/')}/v1/predict", bodies, concurrency,
                                lambda response: [p["class_name"] for p in response["predictions"]])
    predicted: list[str | None] = [None] * len(images)
    for chunk, names in zip(chunks, answers):
        for i, name in zip(chunk, names):
            predicted[i] = name
    return delivery, predicted


def simulate_traffic(url: str | None, dataset, shift: str = "none", amount: float | None = None,
                     count: int = 200, split: str = "test", seed: int = 0, batch: int = 8,
                     concurrency: int = 4, save: str | None = None) -> TrafficReport:
    """Sample, shift and send (and/or save) images from one split of a prepared dataset."""
    if shift not in SHIFTS:
        raise InputError(f"unknown shift {shift!r}; choose one of: {', '.join(SHIFTS)}")
    if not url and not save:
        raise InputError("give --url to send traffic, --save DIR to write it, or both")
    amount = DEFAULT_AMOUNT[shift] if amount is None else amount
    images, labels = dataset.load_split(split)
    rng = np.random.default_rng(seed)
    picked = choose(labels, count if count > 0 else len(labels), shift, amount, rng)
    images, labels = shift_images(images[picked], shift, amount, rng), labels[picked]
    class_names = dataset.manifest["class_names"]
    report = TrafficReport("images", len(images), shift, amount, split, seed, url=url)
    if save:
        save_folder(images, labels, class_names, save, f"{shift}-{seed}")
        report.saved = str(save)
    if url:
        report.delivery, predicted = send(url, images, batch, concurrency)
        answered = [(name, class_names[label]) for name, label in zip(predicted, labels)
                    if name is not None]
        report.outcomes = dict(Counter(name for name, _ in answered))
        if answered:
            right = sum(name == truth for name, truth in answered)
            report.scores["accuracy"] = round(right / len(answered), 4)
    return report
