"""The Open Inference Protocol's parsing and encoding (serve/oip.py), without a server."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mlsd_ray.serve.oip import ProtocolError, Tensor, encode_infer_response, parse_infer_request


def binary_request(inputs: list[dict], payload: bytes) -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + payload, str(len(header))


def test_json_and_binary_tensors_parse_to_the_same_arrays():
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    as_json = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 2, 2, 1],
                                      "data": pixels.reshape(-1).tolist()}]}).encode()
    _, [from_json] = parse_infer_request(as_json, None, 100)
    body, length = binary_request([{"name": "x", "datatype": "UINT8", "shape": [2, 2, 2, 1],
                                    "parameters": {"binary_data_size": 8}}], pixels.tobytes())
    _, [from_binary] = parse_infer_request(body, length, 100)
    assert np.array_equal(from_json.data, pixels) and np.array_equal(from_binary.data, pixels)


def test_binary_bytes_elements_are_length_prefixed():
    items = [b"png-1", b"", b"three"]
    payload = b"".join(struct.pack("<I", len(i)) + i for i in items)
    body, length = binary_request([{"name": "b", "datatype": "BYTES", "shape": [3],
                                    "parameters": {"binary_data_size": len(payload)}}], payload)
    _, [tensor] = parse_infer_request(body, length, 100)
    assert tensor.data.tolist() == items


@pytest.mark.parametrize("body, length, status, words", [
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}', None,
     400, "holds 3 values"),
    (b'{"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}', None,
     400, "datatype 'FP8'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None,
     400, "shape must be"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1000000], "data": []}]}', None,
     413, "at most 100"),
    (b'{"inputs": []}', None, 400, '"inputs" list'),
    # each of these was a 500
    (b"[" * 150_000, None, 400, "nests JSON too deeply"),
    (b'{"inputs": [' + b"1" * 5000 + b"]}", None, 400, "4300 digits"),
    (b'{"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1], "data": [1]}]}', None,
     400, "datatype ['FP32']"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [4294967296, 4294967296], '
     b'"data": []}]}', None, 413, "18446744073709551616 elements"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], '
     b'"parameters": [1]}]}', None, 400, "parameters must be an object"),
    (b"{}", "99", 400, "runs past the body"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], '
     b'"parameters": {"binary_data_size": 8}}]}\x00\x00', "JSON", 400, "runs past the 2 bytes"),
])
def test_malformed_requests_are_refused_with_their_reason(body, length, status, words):
    if length == "JSON":  # the header is the JSON part, two bytes of binary data follow
        length = str(len(body) - 2)
    with pytest.raises(ProtocolError) as refused:
        parse_infer_request(body, length, 100)
    assert refused.value.status == status and words in refused.value.message


def test_outputs_come_back_as_asked_json_or_binary():
    outputs = [Tensor("p", "FP32", np.array([[0.25, 0.75]], np.float32)),
               Tensor("c", "BYTES", np.array([b"seven"], dtype=object))]
    plain = encode_infer_response({"id": "r1"}, "m", "2", outputs)
    answer = json.loads(plain.body)
    assert answer["id"] == "r1" and answer["model_version"] == "2"
    assert answer["outputs"][0]["data"] == [0.25, 0.75] and answer["outputs"][1]["data"] == [
        "seven"]
    mixed = encode_infer_response({"outputs": [{"name": "p", "parameters": {"binary_data": True}}]},
                                  "m", "2", outputs)
    length = int(mixed.headers["inference-header-content-length"])
    header = json.loads(mixed.body[:length])
    assert [o["name"] for o in header["outputs"]] == ["p"]
    assert np.frombuffer(mixed.body[length:], np.float32).tolist() == [0.25, 0.75]
    with pytest.raises(ProtocolError, match="unknown output 'q'"):
        encode_infer_response({"outputs": [{"name": "q"}]}, "m", "2", outputs)
