"""The Open Inference Protocol (KServe V2 REST), beside `/v1`, for every task's app:

    GET  /v2                                       server metadata
    GET  /v2/health/live, /v2/health/ready         liveness, readiness (the model is loaded)
    GET  /v2/models/{name}[/versions/{v}]          model metadata: input and output tensors
    GET  /v2/models/{name}[/versions/{v}]/ready    200 once this model version is served
    POST /v2/models/{name}[/versions/{v}]/infer    tensors in, tensors out: JSON, or the
                                                   binary tensor extension
                                                   (Inference-Header-Content-Length)

`{name}` is the registered model name and `{v}` its version. Errors are `{"error": "..."}`
with a 4xx for what the client got wrong (the protocol's form, not /v1's). What the tensors
mean is the task's: its routes class implements `v2_signature()` (the tensors it takes and
gives) and `v2_infer(tensors)`; this module parses and encodes the protocol once, here.
"""

# No `from __future__ import annotations`: FastAPI inside a Serve ingress must see the real
# `Request` type of the route methods below.

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mlsd_ray import __version__
from mlsd_ray.serve.schemas import ClientError, ProtocolErrorResponse, documented_errors

if TYPE_CHECKING:
    from mlsd_ray.serve.app import LocalModel, RemoteModel

__all__ = ["add_open_inference_routes", "DATATYPES", "encode_infer_response", "HEADER_LENGTH",
           "OpenInferenceRoutes", "parse_infer_request", "protocol_error", "ProtocolError",
           "Signature", "Tensor", "TensorSpec"]

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output in a model's metadata; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(frozen=True)
class Signature:
    """The tensors a task's model takes (any one of `alternatives` may replace `inputs`) and
    gives."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    alternatives: list[TensorSpec] = field(default_factory=list)


@dataclass
class Tensor:
    """A named n-dimensional array with its protocol datatype (BYTES: an object array of
    bytes)."""

    name: str
    datatype: str
    data: np.ndarray


class ProtocolError(Exception):
    """A request the protocol refuses: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------- requests


def parse_infer_request(body: bytes, header_length: str | None,
                        max_elements: int) -> tuple[dict, list[Tensor]]:
    """The request's JSON part and its input tensors (JSON data or binary, as each says)."""
    json_part, binary = _split_body(body, header_length)
    try:
        request = json.loads(json_part)
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise ProtocolError(400, "the inference request nests JSON too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise ProtocolError(400, f"the inference request is not JSON: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) \
            or not request["inputs"]:
        raise ProtocolError(400, 'the inference request needs an "inputs" list of tensors')
    tensors, offset = [], 0
    for index, entry in enumerate(request["inputs"]):
        tensor, used = _input_tensor(entry, index, binary, offset, max_elements)
        tensors.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data belong to no "
                                 "input (binary_data_size)")
    return request, tensors


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise ProtocolError(400, f"Inference-Header-Content-Length {header_length!r} runs past "
                                 f"the body of {len(body)} bytes")
    return body[:int(header_length)], body[int(header_length):]


def _input_tensor(entry: object, index: int, binary: bytes, offset: int,
                  max_elements: int) -> tuple[Tensor, int]:
    """Input `index`, and how many bytes of the binary part it took."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(400, f"input {index} needs a name, a datatype and a shape")
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(400, f"input {name!r}: datatype {datatype!r} is not one of "
                                 f"{', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {name!r}: shape must be a list of sizes >= 0, "
                                 f"not {shape!r}")
    count = math.prod(shape)  # Python's integers: int64 would wrap [2**32, 2**32] to 0
    if count > max_elements:
        raise ProtocolError(413, f"input {name!r} has {count} elements; at most "
                                 f"{max_elements} per request")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return Tensor(name, datatype, _json_data(entry.get("data"), name, datatype, shape,
                                                 count)), 0
    if not isinstance(size, int) or size < 0 or offset + size > len(binary):
        raise ProtocolError(400, f"input {name!r}: binary_data_size {size!r} runs past the "
                                 f"{len(binary)} bytes of binary data")
    chunk = binary[offset:offset + size]
    return Tensor(name, datatype, _binary_data(chunk, name, datatype, shape, count)), size


def _json_data(data: object, name: str, datatype: str, shape: list[int],
               count: int) -> np.ndarray:
    try:
        flat = list(_flatten(data)) if isinstance(data, list) else None
    except RecursionError:
        raise ProtocolError(400, f"input {name!r}: data nests too deeply") from None
    if flat is None or len(flat) != count:
        found = "no data list" if flat is None else f"{len(flat)} values"
        raise ProtocolError(400, f"input {name!r}: shape {shape} holds {count} values; the "
                                 f"data has {found}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(400, f"input {name!r}: BYTES data in JSON must be strings")
        return np.array([v.encode() for v in flat], dtype=object).reshape(shape)
    try:
        array = np.array(flat, dtype=DATATYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"input {name!r}: data is not {datatype}: {exc}") from exc
    return array.reshape(shape)


def _flatten(data: list):
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _binary_data(chunk: bytes, name: str, datatype: str, shape: list[int],
                 count: int) -> np.ndarray:
    if datatype == "BYTES":
        items, position = [], 0
        while position < len(chunk):
            if position + 4 > len(chunk):
                raise ProtocolError(400, f"input {name!r}: a BYTES length runs past its data")
            (length,) = struct.unpack_from("<I", chunk, position)
            position += 4
            if position + length > len(chunk):
                raise ProtocolError(400, f"input {name!r}: a BYTES element runs past its data")
            items.append(chunk[position:position + length])
            position += length
        if len(items) != count:
            raise ProtocolError(400, f"input {name!r}: shape {shape} holds {count} values; the "
                                     f"binary data has {len(items)}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(DATATYPES[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(400, f"input {name!r}: shape {shape} of {datatype} takes "
                                 f"{count * dtype.itemsize} bytes; binary_data_size is "
                                 f"{len(chunk)}")
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)


# ----------------------------------------------------------------------------- responses


def encode_infer_response(request: dict, model_name: str, version: str,
                          outputs: list[Tensor]) -> Response:
    """The response: the outputs the request asked for (all when it names none), each as JSON
    data or, where asked (`binary_data` per output, `binary_data_output` for all), binary."""
    wanted = request.get("outputs") or [{"name": t.name} for t in outputs]
    every_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    by_name = {t.name: t for t in outputs}
    entries, chunks = [], []
    for asked in wanted:
        name = asked.get("name") if isinstance(asked, dict) else None
        if name not in by_name:
            raise ProtocolError(400, f"unknown output {name!r}; the outputs are "
                                     f"{', '.join(by_name)}")
        tensor = by_name[name]
        entry = {"name": name, "datatype": tensor.datatype, "shape": list(tensor.data.shape)}
        if (asked.get("parameters") or {}).get("binary_data", every_binary):
            chunk = _binary_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _json_values(tensor)
        entries.append(entry)
    header = {"model_name": model_name, "model_version": version, "outputs": entries}
    if "id" in request:
        header["id"] = request["id"]
    text = json.dumps(header).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


def _json_values(tensor: Tensor) -> list:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                for v in flat]
    return flat.tolist()


def _binary_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.data.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    dtype = np.dtype(DATATYPES[tensor.datatype]).newbyteorder("<")
    return np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()


# ----------------------------------------------------------------------------- routes


def protocol_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


class OpenInferenceRoutes:
    """Mixin of a task's routes class: the V2 routes. The class provides `model` (LocalModel or
    RemoteModel), `v2_signature(info)`, `async v2_infer(tensors: dict[str, np.ndarray],
    request_id) -> list[Tensor]`, `v2_max_body_bytes` and `_authorize(request)`."""

    if TYPE_CHECKING:  # what the task's routes class provides
        model: LocalModel | RemoteModel
        v2_max_body_bytes: int

        def v2_signature(self, info: dict) -> Signature: ...

        async def v2_infer(self, tensors: dict[str, np.ndarray],
                           request_id: str | None) -> list[Tensor]: ...

        def _authorize(self, request: Request) -> None: ...

    async def v2_server(self) -> dict:
        return {"name": "mlsd-ray", "version": __version__,
                "extensions": ["binary_tensor_data"]}

    async def v2_live(self) -> dict:
        return {"live": True}

    async def v2_ready(self):
        try:
            await self.model.describe()
        except Exception as exc:  # no replica yet, or it died: not ready
            return protocol_error(503, f"model not ready: {type(exc).__name__}")
        return {"ready": True}

    async def _served(self, name: str, version: str | None) -> dict:
        """The served model's description, if `name` (and `version`) are what is served."""
        info = await self.model.describe()
        if name != info["model_name"] or version not in (None, str(info["model_version"])):
            asked = name + (f" version {version}" if version is not None else "")
            raise ProtocolError(404, f"model {asked} is not served here; this app serves "
                                     f"{info['model_name']} version {info['model_version']}")
        return info

    async def v2_model(self, request: Request, name: str, version: str | None = None):
        try:
            self._authorize(request)
            info = await self._served(name, version)
        except (ProtocolError, ClientError) as exc:
            return protocol_error(exc.status, exc.message)
        signature = self.v2_signature(info)
        return {"name": info["model_name"], "versions": [str(info["model_version"])],
                "platform": "mlsd-ray/pytorch",
                "inputs": [t.as_dict() for t in signature.inputs],
                "outputs": [t.as_dict() for t in signature.outputs],
                "parameters": {"alternative_inputs": [t.as_dict()
                                                      for t in signature.alternatives]}}

    async def v2_model_ready(self, name: str, version: str | None = None):
        try:
            info = await self._served(name, version)
        except ProtocolError as exc:
            return protocol_error(exc.status, exc.message)
        return {"name": info["model_name"], "ready": True}

    async def v2_infer_route(self, request: Request, name: str, version: str | None = None):
        from mlsd_ray.serve.app import REQUEST_ID_HEADER, read_body

        try:
            self._authorize(request)
            info = await self._served(name, version)
            body = await read_body(request, self.v2_max_body_bytes)
            # Every element takes at least a byte of the body: no more can be real.
            parsed, tensors = parse_infer_request(body, request.headers.get(HEADER_LENGTH),
                                                  self.v2_max_body_bytes)
            request_id = str(parsed.get("id") or request.headers.get(REQUEST_ID_HEADER) or "")
            outputs = await self.v2_infer({t.name: t.data for t in tensors}, request_id or None)
            return encode_infer_response(parsed, info["model_name"],
                                         str(info["model_version"]), outputs)
        except (ProtocolError, ClientError) as exc:
            return protocol_error(exc.status, exc.message)


def add_open_inference_routes(api: FastAPI) -> None:
    """Mount the V2 routes (methods of OpenInferenceRoutes) on a task's FastAPI app."""
    get, post = ["GET"], ["POST"]
    routes: list[tuple[str, Callable[..., Any], list[str], str]] = [
        ("/v2", OpenInferenceRoutes.v2_server, get, "Server metadata (V2)"),
        ("/v2/health/live", OpenInferenceRoutes.v2_live, get, "Liveness (V2)"),
        ("/v2/health/ready", OpenInferenceRoutes.v2_ready, get, "Readiness (V2)")]
    for suffix in ("", "/versions/{version}"):
        model = "/v2/models/{name}" + suffix
        routes += [(model, OpenInferenceRoutes.v2_model, get, "Model metadata (V2)"),
                   (model + "/ready", OpenInferenceRoutes.v2_model_ready, get,
                    "Model readiness (V2)"),
                   (model + "/infer", OpenInferenceRoutes.v2_infer_route, post,
                    "Inference (V2): JSON or binary tensors")]
    for path, endpoint, methods, summary in routes:
        api.add_api_route(path, endpoint, methods=methods, summary=summary,
                          responses=documented_errors(ProtocolErrorResponse))
