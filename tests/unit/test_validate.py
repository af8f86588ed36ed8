import io

import numpy as np
import pytest
from PIL import Image

from mlsd_ray.tasks.image.data import validate as v


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


SPEC = v.ValidationSpec(image_size=8, channels=3, class_names=("a", "b"))


def test_decodes_png_to_hwc():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    assert np.array_equal(v.decode_bytes(png_bytes(rgb)), rgb)
    gray = rgb[:, :, 0]
    assert v.decode_bytes(png_bytes(gray)).shape == (10, 12, 1)


@pytest.mark.parametrize("data, reason", [
    (b"", v.CORRUPT_IMAGE), (b"not an image", v.CORRUPT_IMAGE),
    (None, v.MISSING_IMAGE), (float("nan"), v.MISSING_IMAGE)])
def test_garbage_is_rejected(data, reason):
    with pytest.raises(v.Rejected) as info:
        v.decode_bytes(data)
    assert info.value.reason == reason


def test_read_errors_and_nan_labels_from_ray():
    batch = {"id": np.array(["1", "2"], dtype=object), "source": np.array(["", ""], dtype=object),
             "label": np.array([np.float32("nan"), "a"], dtype=object),  # Ray: all-None -> NaN
             "bytes": np.array([png_bytes(np.zeros((4, 4), np.uint8)), b""], dtype=object),
             "read_error": np.array(["", "cannot read file: permission denied"], dtype=object)}
    out = v.validate_batch(batch, SPEC)
    assert list(out["status"]) == [v.MISSING_LABEL, v.UNREADABLE_FILE]
    assert "permission denied" in out["detail"][1]


def test_truncated_png_is_corrupt():
    data = png_bytes(np.zeros((32, 32, 3), np.uint8) + 7)
    with pytest.raises(v.Rejected) as info:
        v.decode_bytes(data[: len(data) // 2])
    assert info.value.reason == v.CORRUPT_IMAGE


def test_float_image_mode_is_unsupported():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.float32)).save(buffer, format="TIFF")
    with pytest.raises(v.Rejected) as info:
        v.decode_bytes(buffer.getvalue())
    assert info.value.reason == v.UNSUPPORTED_MODE


def test_arrays_are_scaled_and_checked():
    unit = np.full((4, 4), 0.5, np.float32)
    assert v.coerce_array(unit)[0, 0, 0] == 128
    byte = np.full((4, 4), 200.0)
    assert v.coerce_array(byte)[0, 0, 0] == 200
    chw = np.zeros((3, 5, 6), np.uint8)
    assert v.coerce_array(chw).shape == (5, 6, 3)
    nested = [[1, 2], [3, 4]]
    assert v.coerce_array(nested).shape == (2, 2, 1)


@pytest.mark.parametrize("value, reason", [
    (np.array([[np.nan, 1.0]]), v.NON_FINITE),
    (np.array([[np.inf, 1.0]]), v.NON_FINITE),
    (np.array([[-1, 3]]), v.OUT_OF_RANGE),
    (np.array([[300, 3]]), v.OUT_OF_RANGE),
    (np.zeros((2, 2, 2, 2)), v.BAD_SHAPE),
    (np.zeros((5, 5, 7)), v.BAD_SHAPE),
    ([[1, 2], [3]], v.BAD_SHAPE),
    (np.array([["a", "b"]]), v.BAD_SHAPE),
])
def test_bad_arrays(value, reason):
    with pytest.raises(v.Rejected) as info:
        v.coerce_array(value)
    assert info.value.reason == reason


def test_unit_range_is_enforced_when_asked():
    with pytest.raises(v.Rejected) as info:
        v.coerce_array(np.full((2, 2), 3.0), pixel_range="unit")
    assert info.value.reason == v.OUT_OF_RANGE


def test_labels():
    assert v.check_label("b", ("a", "b")) == 1
    for missing in (None, "", float("nan")):
        with pytest.raises(v.Rejected) as info:
            v.check_label(missing, ("a",))
        assert info.value.reason == v.MISSING_LABEL
    with pytest.raises(v.Rejected) as info:
        v.check_label("zebra", ("a",))
    assert info.value.reason == v.UNKNOWN_LABEL


def test_hash_sees_pixels_not_encoding():
    rgb = np.random.default_rng(1).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    assert v.content_hash(v.decode_bytes(png_bytes(rgb))) == v.content_hash(rgb)
    assert v.content_hash(rgb) != v.content_hash(rgb[::-1])


def test_batch_keeps_every_row_and_says_why():
    good = np.random.default_rng(2).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    batch = {"id": np.array(["1", "2", "3", "4"], dtype=object),
             "source": np.array(["s1", "s2", "s3", "s4"], dtype=object),
             "label": np.array(["a", "b", None, "zzz"], dtype=object),
             "bytes": np.array([png_bytes(good), b"junk", png_bytes(good), png_bytes(good)],
                               dtype=object)}
    out = v.validate_batch(batch, SPEC)
    assert list(out["status"]) == [v.OK, v.CORRUPT_IMAGE, v.MISSING_LABEL, v.UNKNOWN_LABEL]
    assert out["image"].shape == (4, 8, 8, 3) and out["image"].dtype == np.uint8
    assert list(out["label"]) == [0, -1, -1, -1]
    assert out["payload"][1] == b"junk"  # quarantine keeps the original bytes
    assert out["orig_height"][0] == 12


def test_batch_of_arrays_saves_bad_payload_as_npy():
    batch = {"id": np.array(["x", "y"], dtype=object), "source": np.array(["", ""], dtype=object),
             "label": np.array(["a", "a"], dtype=object),
             "array": np.array([np.zeros((4, 4)), np.full((4, 4), np.nan)])}
    out = v.validate_batch(batch, SPEC)
    assert list(out["status"]) == [v.OK, v.NON_FINITE]
    restored = np.load(io.BytesIO(out["payload"][1]))
    assert np.isnan(restored).all()


def test_small_images_are_rejected():
    spec = v.ValidationSpec(image_size=8, channels=1, class_names=("a",), min_side=3)
    batch = {"id": np.array(["x"], dtype=object), "source": np.array([""], dtype=object),
             "label": np.array(["a"], dtype=object), "array": np.zeros((1, 2, 5), np.uint8)}
    assert v.validate_batch(batch, spec)["status"][0] == v.BAD_SHAPE


def test_exif_orientation_is_applied():
    wide = np.zeros((4, 10, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="JPEG", exif=exif)
    assert v.decode_bytes(buffer.getvalue()).shape == (10, 4, 3)
