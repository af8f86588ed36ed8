"""Per-row validation and standardisation, run in parallel inside Ray Data `map_batches`.

Every raw row comes in with `id`, `source`, `label` (a class name, or None) and one payload
column: `bytes` (an encoded image) or `array` (numeric pixels). Every row comes out, valid or
not, with a `status` that is `ok` or the reason it goes to quarantine; nothing is dropped here.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mlsd_ray.tasks.image.data.transforms import standardize

OK = "ok"
UNREADABLE_FILE = "unreadable_file"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
UNSUPPORTED_MODE = "unsupported_mode"
BAD_SHAPE = "bad_shape"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
MISSING_LABEL = "missing_label"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE = "duplicate"

# PIL modes we convert (to L or RGB); anything else (16-bit, float, ...) is quarantined.
_MODE_TO = {"1": "L", "L": "L", "LA": "L", "I;16": None, "P": "RGB", "PA": "RGB",
            "RGB": "RGB", "RGBA": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
            "LAB": None, "HSV": None, "I": None, "F": None}


class Rejected(Exception):
    """A row failed validation; `reason` is one of the module's reason codes."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ValidationSpec:
    """What a valid row looks like after standardisation."""

    image_size: int
    channels: int
    class_names: tuple[str, ...]
    pixel_range: str = "auto"
    min_side: int = 2


def is_missing(value) -> bool:
    """None or NaN (Ray Data turns an all-None column into float NaN)."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def decode_bytes(data: bytes | None, max_side: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a uint8 H×W×C array, or raise Rejected.

    `max_side` refuses larger images from their header, before decoding any pixel: a few KB
    of PNG can declare 30,000×30,000 pixels (a decompression bomb)."""
    if data is None or is_missing(data):
        raise Rejected(MISSING_IMAGE, "no image data (a null value)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_side is not None and max(img.size) > max_side:
                raise Rejected(BAD_SHAPE, f"{img.size[1]}×{img.size[0]} pixels declared; "
                                          f"sides must be at most {max_side}")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # camera photos: upright, as people see
            target = _MODE_TO.get(img.mode)
            if target is None:
                raise Rejected(UNSUPPORTED_MODE, f"image mode {img.mode!r} is not supported")
            array = np.asarray(img.convert(target))
    except Rejected:
        raise
    except Image.UnidentifiedImageError as exc:
        raise Rejected(CORRUPT_IMAGE, f"not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Rejected(CORRUPT_IMAGE, f"cannot decode image: {exc}") from exc
    return array if array.ndim == 3 else array[:, :, None]


def _as_hwc(array: np.ndarray) -> np.ndarray:
    """Accept H×W, H×W×C (C in 1, 3, 4) and C×H×W (C in 1, 3); reject other shapes."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return array
    if array.ndim == 3 and array.shape[0] in (1, 3):
        return np.transpose(array, (1, 2, 0))
    raise Rejected(BAD_SHAPE, f"shape {array.shape} is not H×W, H×W×C or C×H×W")


def _scale_to_uint8(array: np.ndarray, pixel_range: str) -> np.ndarray:
    """Integers must lie in [0, 255]; floats in [0, 1] (unit) or [0, 255] (byte); auto decides."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise Rejected(NON_FINITE, f"{bad} NaN/inf pixel values")
        high = float(array.max()) if array.size else 0.0
        unit = pixel_range == "unit" or (pixel_range == "auto" and high <= 1.0)
        limit = 1.0 if unit else 255.0
        if float(array.min()) < 0 or high > limit:
            raise Rejected(OUT_OF_RANGE, f"values in [{array.min():g}, {high:g}], "
                                         f"expected [0, {limit:g}]")
        return np.rint(array * (255.0 if unit else 1.0)).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise Rejected(OUT_OF_RANGE, f"integer values in [{low}, {high}], expected [0, 255]")
    return array.astype(np.uint8)


def coerce_array(value, pixel_range: str = "auto") -> np.ndarray:
    """Numeric pixels (nested lists or ndarray) to uint8 H×W×C, or raise Rejected."""
    try:
        array = np.asarray(value if not isinstance(value, np.ndarray) or value.dtype != object
                           else value.tolist())
    except ValueError as exc:  # ragged nested lists
        raise Rejected(BAD_SHAPE, f"pixels are not a rectangular array: {exc}") from exc
    if array.dtype.kind not in "uifb":
        raise Rejected(BAD_SHAPE, f"pixels have non-numeric dtype {array.dtype}")
    if array.size == 0:
        raise Rejected(BAD_SHAPE, f"no pixels: an array of shape {list(array.shape)}")
    return _scale_to_uint8(_as_hwc(array), pixel_range)


def check_label(label, class_names: tuple[str, ...]) -> int:
    """The class index of a label name, or raise Rejected (missing or unknown)."""
    if is_missing(label) or str(label) == "":
        raise Rejected(MISSING_LABEL, "row has no label")
    try:
        return class_names.index(str(label))
    except ValueError:
        raise Rejected(UNKNOWN_LABEL, f"label {label!r} is not one of the "
                                      f"{len(class_names)} known classes") from None


def content_hash(image: np.ndarray) -> str:
    """Hash of decoded pixels and shape: equal for exact duplicates, whatever the file encoding."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _validate_row(payload, is_bytes: bool, label, spec: ValidationSpec,
                  read_error: str = "") -> dict:
    if read_error:
        raise Rejected(UNREADABLE_FILE, read_error)
    raw = decode_bytes(payload) if is_bytes else coerce_array(payload, spec.pixel_range)
    height, width = raw.shape[:2]
    if min(height, width) < spec.min_side:
        raise Rejected(BAD_SHAPE, f"image is {height}×{width}, below min_side={spec.min_side}")
    label_index = check_label(label, spec.class_names)
    return {"image": standardize(raw, spec.image_size, spec.channels), "label": label_index,
            "hash": content_hash(raw), "orig_height": height, "orig_width": width,
            "orig_channels": raw.shape[2]}


def _payload_bytes(payload, is_bytes: bool) -> bytes:
    """What quarantine keeps of a bad row: the original bytes, or the array saved as .npy."""
    if is_bytes:
        return b"" if is_missing(payload) else payload
    buffer = io.BytesIO()
    try:
        np.save(buffer, np.asarray(payload), allow_pickle=False)
    except (ValueError, TypeError):
        return repr(payload).encode()
    return buffer.getvalue()


def validate_batch(batch: dict[str, np.ndarray], spec: ValidationSpec) -> dict[str, np.ndarray]:
    """Validate and standardise a batch of raw rows; one output row per input row."""
    is_bytes = "bytes" in batch
    payloads = batch["bytes" if is_bytes else "array"]
    size, channels = spec.image_size, spec.channels
    out: dict[str, list] = {k: [] for k in ("image", "label", "hash", "orig_height", "orig_width",
                                            "orig_channels", "status", "detail", "payload")}
    read_errors = batch.get("read_error", [""] * len(payloads))
    for payload, label, read_error in zip(payloads, batch["label"], read_errors):
        try:
            row = _validate_row(payload, is_bytes, label, spec, read_error)
            row.update(status=OK, detail="", payload=b"")
        except Rejected as rejected:
            row = {"image": np.zeros((size, size, channels), np.uint8), "label": -1, "hash": "",
                   "orig_height": 0, "orig_width": 0, "orig_channels": 0,
                   "status": rejected.reason, "detail": rejected.detail,
                   "payload": _payload_bytes(payload, is_bytes)}
        for key, value in row.items():
            out[key].append(value)
    result = {"id": batch["id"], "source": batch["source"],
              "label_name": np.array(["" if is_missing(v) else str(v) for v in batch["label"]],
                                     dtype=object)}
    result.update({k: np.array(v, dtype=object) for k, v in out.items()
                   if k in ("hash", "status", "detail", "payload")})
    result["image"] = np.stack(out["image"]) if out["image"] else np.zeros((0, size, size,
                                                                            channels), np.uint8)
    for key in ("label", "orig_height", "orig_width", "orig_channels"):
        result[key] = np.array(out[key], dtype=np.int64)
    return result
