"""Summary features of image inputs: what the prediction log records and drift checks compare.

Each feature is one number per image, computed on the image as the model sees it (resized to the
trained size, grey level in [0, 1], before normalisation), so training data and served traffic
are measured the same way. The set is chosen so each common shift moves at least one of them:

    brightness  mean grey level                  inversion, exposure
    contrast    standard deviation of grey level inversion, washed-out images
    edges       mean absolute neighbour gradient noise, blur
    ink         fraction of pixels above 0.5     inversion, stroke width
    orientation angle of the principal axis (deg) rotation
    center_x    intensity-weighted column / width  translation, cropping
    center_y    intensity-weighted row / height
"""

from __future__ import annotations

import numpy as np

FEATURES = ("brightness", "contrast", "edges", "ink", "orientation", "center_x", "center_y")
DECIMALS = 5
REFERENCE_ROWS = 5000  # enough for stable quantiles and KS tests; keeps reference.json small


def grey(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C (or float in [0, 1]) -> float32 N×H×W grey levels in [0, 1]."""
    array = np.asarray(images)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float32) / scale
    return array.mean(axis=3) if array.ndim == 4 else array


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """One value per image and feature (see the module docstring)."""
    g = grey(images)
    n, h, w = g.shape
    flat = g.reshape(n, -1)
    edges = (np.abs(np.diff(g, axis=1)).mean(axis=(1, 2))
             + np.abs(np.diff(g, axis=2)).mean(axis=(1, 2))) / 2
    mass = flat.sum(axis=1) + 1e-8
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = (g * rows).reshape(n, -1).sum(axis=1) / mass
    cx = (g * cols).reshape(n, -1).sum(axis=1) / mass
    dy, dx = rows[None] - cy[:, None, None], cols[None] - cx[:, None, None]
    mu20 = (g * dx * dx).reshape(n, -1).sum(axis=1) / mass
    mu02 = (g * dy * dy).reshape(n, -1).sum(axis=1) / mass
    mu11 = (g * dx * dy).reshape(n, -1).sum(axis=1) / mass
    # Angle of the principal axis from the vertical, in (-90, 90]: upright strokes sit near 0,
    # so the common case does not straddle the ±90 wrap-around.
    orientation = np.degrees(0.5 * np.arctan2(2 * mu11, mu02 - mu20))
    values = {"brightness": flat.mean(axis=1), "contrast": flat.std(axis=1), "edges": edges,
              "ink": (flat > 0.5).mean(axis=1), "orientation": orientation,
              "center_x": cx / max(w - 1, 1), "center_y": cy / max(h - 1, 1)}
    # Rounded here, once, for the reference and the log alike: a reference stored rounded
    # and traffic logged unrounded differ systematically on discrete features (ink = k/64).
    return {name: np.round(v.astype(np.float64), DECIMALS) for name, v in values.items()}


def reference_profile(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                      seed: int = 0) -> dict:
    """Per-feature samples (at most REFERENCE_ROWS images) and the label counts of a split."""
    if len(images) > REFERENCE_ROWS:
        pick = np.random.default_rng(seed).choice(len(images), REFERENCE_ROWS, replace=False)
        images = images[np.sort(pick)]
    features = image_features(images)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    return {"features": {name: values.tolist() for name, values in features.items()},
            "label_counts": {name: int(c) for name, c in zip(class_names, counts)}}
