"""Request decoding and answers of the HTTP API, without Ray."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.serve.schemas import ClientError, parse_json
from mlsd_ray.tasks.image import schemas
from tests.conftest import png_declaring


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_arrays_and_pngs_decode_to_the_same_pixels():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    from_list, from_png, from_unit = schemas.instances_from_json(
        {"instances": [image.tolist(), {"b64": png(image)}, (image / 255.0).tolist()]}, 10)
    assert from_list.shape == (8, 8, 1)
    np.testing.assert_array_equal(from_list, from_png)
    np.testing.assert_array_equal(from_list, from_unit)


@pytest.mark.parametrize(("payload", "status", "code"), [
    ([], 422, "missing_instances"),
    ({"instances": {}}, 422, "bad_instances"),
    ({"instances": []}, 422, "empty_instances"),
    ({"instances": [[[0]]] * 3}, 413, "too_many_instances"),
    ({"instances": ["text"]}, 422, "bad_instance"),
    ({"instances": [{"b64": "QUJD", "extra": 1}]}, 422, "bad_instance"),
    ({"instances": [{"b64": "not base64!"}]}, 422, "bad_base64"),
    ({"instances": [[1, 2, 3]]}, 422, "bad_shape"),
    ({"instances": [[[0, 1], [2]]]}, 422, "bad_shape"),
    ({"instances": [[[255.5, 0], [0, 0]]]}, 422, "out_of_range"),
    ({"instances": [[[-1, 0], [0, 0]]]}, 422, "out_of_range"),
    ({"instances": [np.zeros((1, 5)).tolist()]}, 422, "bad_shape"),
    ({"instances": [np.zeros((2000, 2)).tolist()]}, 422, "bad_shape"),
    ({"instances": [[[]]]}, 422, "bad_shape"),  # no pixels (was a 500: min of nothing)
    ({"instances": [[[[]]]]}, 422, "bad_shape"),
])
def test_bad_instances_name_the_problem(payload, status, code):
    with pytest.raises(ClientError) as caught:
        schemas.instances_from_json(payload, max_instances=2)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.body()["error"]["message"]


def test_the_failing_instance_is_named():
    good = np.zeros((4, 4)).tolist()
    with pytest.raises(ClientError, match="instance 2: "):
        schemas.instances_from_json({"instances": [good, good, [[float("nan")] * 4] * 4]}, 5)


def test_malformed_json_and_uploads():
    with pytest.raises(ClientError, match="not valid JSON") as caught:
        parse_json(b'{"instances": [')
    assert caught.value.status == 400
    # Both were 500s: Python's parser recurses per level, and refuses long integers
    with pytest.raises(ClientError, match="nests JSON too deeply") as caught:
        parse_json(b"[" * 150_000 + b"]" * 150_000)
    assert caught.value.status == 400
    with pytest.raises(ClientError, match="4300 digits") as caught:
        parse_json(b'{"instances": [[[' + b"1" * 5000 + b"]]]}")
    assert caught.value.status == 400
    with pytest.raises(ClientError, match="not a recognised image"):
        schemas.decode_upload(b"GIF89a but not really", "x.gif")
    with pytest.raises(ClientError, match="is empty"):
        schemas.decode_upload(b"", "empty.png")


@pytest.mark.parametrize("side, words", [
    (9_000, "9000×9000 pixels declared"),  # 81 MB decoded, under Pillow's own bomb limit
    (30_000, "could be decompression bomb"),  # Pillow refuses 900 million pixels itself
])
def test_a_decompression_bomb_is_refused_from_its_header(side, words):
    bomb = png_declaring(side, side)
    assert len(bomb) < 100
    for decode in (lambda: schemas.decode_upload(bomb, "bomb.png"),
                   lambda: schemas.instances_from_json(
                       {"instances": [{"b64": base64.b64encode(bomb).decode()}]}, 2)):
        with pytest.raises(ClientError, match=words) as caught:
            decode()
        assert caught.value.status == 422


def test_top_k_orders_classes_by_probability():
    answers = schemas.top_k(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], k=2)
    assert answers == [{"class_index": 1, "class_name": "b",
                        "probabilities": {"b": 0.7, "c": 0.2}}]


def test_serve_config_rejects_batches_that_cannot_fill():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig(max_batch_size=64, max_ongoing_requests=8)
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
