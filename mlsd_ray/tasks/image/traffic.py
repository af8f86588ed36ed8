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
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mlsd_ray.core.errors import InputError

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


def send(url: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
         batch: int, concurrency: int) -> dict:
    """POST the images as base64 PNGs, `batch` per request, `concurrency` requests at a time."""
    from mlsd_ray.serve.client import b64_instance, post_json

    endpoint = f"{url.rstrip('/')}/v1/predict"
    chunks = [range(start, min(start + batch, len(images)))
              for start in range(0, len(images), batch)]

    def one(indices: range) -> tuple[list[str], str | None, str | None]:
        body = {"instances": [b64_instance(png_bytes(images[i])) for i in indices]}
        try:
            answer = post_json(endpoint, body)
        except Exception as exc:  # counted and reported, the run goes on
            return [], None, f"{type(exc).__name__}: {exc}"
        return [p["class_name"] for p in answer["predictions"]], answer["model_version"], None

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, chunks))
    seconds = time.perf_counter() - started
    errors = [error for _, _, error in results if error]
    correct = sum(predicted == class_names[labels[i]]
                  for (names, _, _), indices in zip(results, chunks)
                  for predicted, i in zip(names, indices))
    answered = sum(len(names) for names, _, _ in results)
    return {"requests": len(chunks), "failed_requests": len(errors), "errors": errors[:5],
            "images_answered": answered, "answered": answered,
            "accuracy": round(correct / answered, 4) if answered else None,
            "model_versions": dict(Counter(v for _, v, _ in results if v)),
            "seconds": round(seconds, 2),
            "images_per_second": round(answered / seconds, 1) if seconds else None}


def simulate_traffic(url: str | None, dataset, shift: str = "none", amount: float | None = None,
                     count: int = 200, split: str = "test", seed: int = 0, batch: int = 8,
                     concurrency: int = 4, save: str | None = None) -> dict:
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
    summary = {"shift": shift, "amount": amount, "split": split, "seed": seed,
               "images": len(images),
               "true_classes": dict(Counter(class_names[i] for i in labels.tolist()))}
    if save:
        summary["saved"] = {"folder": str(save), "images": save_folder(
            images, labels, class_names, save, f"{shift}-{seed}")}
    if url:
        summary.update(url=url, **send(url, images, labels, class_names, batch, concurrency))
    return summary
