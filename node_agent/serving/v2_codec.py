"""KServe v2 (Open Inference Protocol) tensors over HTTP: decode requests, encode responses.

Pure: bytes and dicts in, numpy arrays and bytes out; no I/O, no web framework. The tensor
helpers (`tensor_from_bytes`, `tensor_bytes`, `selected_outputs`, the checks) serve gRPC's
codec too (`serving.grpc_codec`), so a tensor means the same on both protocols. Every
decoding error is an `InvalidInput` whose message names the tensor and what was wrong.

JSON: `{"id", "parameters", "inputs": [{"name", "datatype", "shape", "data"}], "outputs":
[{"name", "parameters"}]}`; `data` is a flat (row-major) or nested list.

Triton's binary tensor data extension: when the request has an `Inference-Header-Content-Length`
of H, the body is H bytes of JSON, then the raw bytes of every input whose
`parameters.binary_data_size` is set, in the order the inputs are listed. Fixed-size datatypes
are little-endian and row-major; a BYTES element is a 4-byte little-endian length and that many
bytes. Responses do the same for outputs asked for in binary: `outputs[i].parameters.binary_data`,
or, for outputs the request does not list, its `parameters.binary_data_output`.

Invariants: a decoded tensor holds exactly `prod(shape)` elements, and decoding allocates in
proportion to the body, never to what a shape claims (JSON: the element count must equal the
shape's product; binary: `binary_data_size` must equal the product times the item size and lie
inside the body), so a small body cannot make the agent allocate a large tensor.

Tensor conventions match the engine's: numpy arrays, batch dimension first; BF16 travels as
uint16 arrays holding the raw bits; BYTES as object arrays of `bytes`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from edgefleet_api.types import Priority
from node_agent.errors import InferenceFailed, InvalidInput
from node_agent.types import ModelConfig, TensorSpec

MAX_TENSORS = 256
"""Inputs or requested outputs in one request; models have a handful."""
MAX_DIMS = 32
MAX_NAME_LEN = 256

# v2 datatype -> the little-endian numpy dtype its binary form and our arrays use.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}  # fmt: skip
DATATYPES: frozenset[str] = frozenset(DTYPES) | {"BYTES"}
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})
_TRITON_TYPES = {dt: "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}" for dt in DATATYPES}
PLATFORMS = {"torchscript": "pytorch_libtorch", "tensorrt": "tensorrt_plan"}
"""Our model formats -> the platform names Triton reports for them."""
_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the request names; `binary` None: the request's `binary_data_output`."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request.

    `inputs` keeps the request's order; `datatypes` holds what each input declared (the
    arrays alone cannot tell BF16 from UINT16). `outputs` is None when the request names
    none (then every output of the model is returned).
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    """A response body; `header_length` (the JSON part's size) is set when binary data
    follows the JSON, and goes into the `Inference-Header-Content-Length` header."""

    body: bytes
    header_length: int | None


# --------------------------------------------------------------------------------------------
# request parameters


def priority_from(value: object, default: Priority) -> Priority:
    """The priority class a request's `priority` parameter asks for.

    Integers follow Triton: 0 (or absent) is the model's default level and lower values are
    more urgent, so 1 -> CRITICAL, 2 -> HIGH, 3 -> NORMAL and 4 or more -> LOW (Triton models
    may declare more levels than our four classes; the least urgent ones share LOW). Strings
    are our class names (critical, high, normal, low), in any case.
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(
            f"parameter 'priority' must be an integer >= 0 (Triton levels: 1 is the most urgent, "
            f"0 the model's default) or one of critical, high, normal, low; got {value!r}"
        )
    if isinstance(value, str):
        try:
            return Priority[value.strip().upper()]
        except KeyError:
            raise InvalidInput(
                f"parameter 'priority': unknown class {value!r}; expected critical, high, normal, "
                "low or a Triton priority level (an integer >= 0)"
            ) from None
    if value < 0:
        raise InvalidInput(f"parameter 'priority' must be >= 0, got {value}")
    if value == 0:
        return default
    return Priority(min(value - 1, Priority.LOW))


def timeout_s_from(value: object) -> float | None:
    """The deadline a request's `timeout` parameter gives, in seconds from now.

    As Triton's: microseconds, a number >= 0; 0 or absent means no timeout.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"parameter 'timeout' must be a number of microseconds, got {value!r}")
    if value < 0:
        raise InvalidInput(f"parameter 'timeout' must be >= 0 microseconds, got {value}")
    return None if value == 0 else value / 1e6


# --------------------------------------------------------------------------------------------
# decoding


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header's value (None when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise InvalidInput(
            f"header Inference-Header-Content-Length must be a non-negative integer, got {value!r}"
        )
    return int(text)


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON + binary tensor data when
    `header_length` is given). Arrays of binary inputs may be views of `body`."""
    if header_length is None:
        doc = parse_json(body)
        binary = memoryview(b"")
    else:
        if header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the body has only {len(body)} bytes"
            )
        doc = parse_json(body[:header_length])
        binary = memoryview(body)[header_length:]
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request must be a JSON object, got {_kind(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_kind(request_id)}")
    parameters = _parameters(doc.get("parameters"), "the request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput(f"parameter 'binary_data_output' must be true or false, got {binary_output!r}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    if len(raw_inputs) > MAX_TENSORS:
        raise InvalidInput(f"'inputs' lists {len(raw_inputs)} tensors; at most {MAX_TENSORS} are allowed")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        name, datatype, array, used = _decode_input(i, raw, binary, offset)
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        inputs[name] = array
        datatypes[name] = datatype
        offset += used
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data after the last input's "
            "(binary_data_size of the inputs does not add up to the binary part)"
        )
    return InferRequest(
        id=request_id,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_output=binary_output,
        parameters=parameters,
    )


def check_request(request: InferRequest, config: ModelConfig) -> None:
    """Raise `InvalidInput` when an input declares another datatype than the model takes, or
    an output the model does not have is requested. (Names and shapes are the engine's.)"""
    specs = {s.name: s for s in config.inputs}
    for name, datatype in request.datatypes.items():
        spec = specs.get(name)
        if spec is not None and spec.datatype != datatype:
            raise InvalidInput(
                f"{config.id}: input {name!r} has datatype {datatype}, but the model takes {spec.datatype}"
            )
    if request.outputs is not None:
        known = [s.name for s in config.outputs]
        for out in request.outputs:
            if out.name not in known:
                raise InvalidInput(
                    f"{config.id}: unknown output {out.name!r}; the model's outputs are "
                    f"{', '.join(repr(n) for n in known)}"
                )


def parse_json(data: bytes | bytearray) -> Any:
    """A request body's JSON. orjson first: a 250 kB image tensor then costs about 0.5 ms of the
    event loop (which every request shares) instead of the stdlib's 4.5. What orjson refuses (NaN
    and Infinity literals, which Python and Triton clients send, integers beyond 64 bits, and
    invalid JSON) goes to the stdlib parser, which accepts the former and words the errors."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidInput("the request JSON is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise InvalidInput(f"the request JSON is not valid UTF-8: {e.reason} at byte {e.start}") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing huge numbers
        raise InvalidInput(f"the request body is not valid JSON: {e}") from None


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'parameters' of {where} must be a JSON object, got {_kind(value)}")
    return value


def _decode_input(
    index: int, raw: object, binary: memoryview, offset: int
) -> tuple[str, str, np.ndarray, int]:
    """One input tensor: (name, datatype, array, binary bytes consumed)."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object, got {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise InvalidInput(f"inputs[{index}]: 'name' must be a non-empty string, got {name!r:.80}")
    datatype = check_datatype(name, raw.get("datatype"))
    shape = check_shape(name, raw.get("shape"))
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), f"input {name!r}")
    size = params.get("binary_data_size")
    has_data = "data" in raw
    if size is None:
        if not has_data:
            raise InvalidInput(f"input {name!r} has no 'data' and no binary_data_size parameter")
        return name, datatype, _from_json(name, datatype, shape, count, raw["data"]), 0
    if has_data:
        raise InvalidInput(f"input {name!r} has both 'data' and a binary_data_size parameter")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0, got {size!r:.40}")
    if offset + size > len(binary):
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} bytes but only {len(binary) - offset} "
            "bytes of binary data remain in the body"
            + ("" if len(binary) else " (is the Inference-Header-Content-Length header missing?)")
        )
    return name, datatype, tensor_from_bytes(name, datatype, shape, binary[offset : offset + size]), size


def check_datatype(name: str, datatype: object) -> str:
    """`datatype` if it is a v2 datatype; InvalidInput naming input `name` otherwise."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r:.40}; expected one of "
            f"{', '.join(sorted(DATATYPES))}"
        )
    return datatype


def check_shape(name: str, value: object) -> tuple[int, ...]:
    """A shape given as a list of at most `MAX_DIMS` integers >= 0; InvalidInput otherwise."""
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise InvalidInput(
            f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} integers, got {value!r:.80}"
        )
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidInput(
                f"input {name!r}: shape {value!r:.80} has a dimension that is not an integer >= 0"
            )
    return tuple(value)


def tensor_from_bytes(name: str, datatype: str, shape: tuple[int, ...], data: memoryview) -> np.ndarray:
    """Input `name` from its binary form (fixed-size datatypes little-endian and row-major,
    BYTES as 4-byte-length-prefixed elements); its size must match the shape exactly."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(name, shape, count, data)
    return _fixed_from_binary(name, datatype, shape, count, data)


def _fixed_from_binary(
    name: str, datatype: str, shape: tuple[int, ...], count: int, chunk: memoryview
) -> np.ndarray:
    dtype = DTYPES[datatype]
    want = count * dtype.itemsize
    if len(chunk) != want:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {len(chunk)} bytes, but shape {list(shape)} of "
            f"{datatype} needs {want} bytes ({count} x {dtype.itemsize})"
        )
    array = np.frombuffer(chunk, dtype=dtype, count=count)
    if not (array.flags.aligned and array.flags.writeable):
        array = array.copy()  # aligned and owned (torch needs both)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _bytes_from_binary(name: str, shape: tuple[int, ...], count: int, chunk: memoryview) -> np.ndarray:
    items: list[bytes] = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = _LEN.unpack_from(chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
        if len(items) > count:
            break
    if len(items) != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, the binary data "
            f"holds {'more' if len(items) > count else len(items)}"
        )
    return object_array(items, shape)


def object_array(items: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A BYTES tensor: an object array of `items` (row-major) in `shape`."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], count: int, data: object) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a list, got {_kind(data)}")
    if datatype == "BYTES":
        items = _flatten_strings(name, data)
        if len(items) != count:
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {len(items)}"
            )
        return object_array(items, shape)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(
            f"input {name!r}: 'data' is not a flat or evenly nested list of {datatype} values"
        ) from None
    if raw.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {raw.size}")
    return _convert(name, datatype, raw, data).reshape(shape)


def _convert(name: str, datatype: str, raw: np.ndarray, data: list[Any]) -> np.ndarray:
    """JSON values (as numpy parsed them) -> the datatype's array, checking kinds and ranges."""
    target = DTYPES[datatype]
    if raw.size == 0:
        return np.empty(0, dtype=target)
    kind = raw.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input {name!r}: BOOL data must be true/false values")
        return raw.astype(target, copy=False).ravel()
    if datatype in _FLOATS:
        if kind not in "iuf":
            raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
        if datatype == "BF16":
            return float_to_bf16_bits(raw.astype(np.float32)).ravel()
        return raw.astype(target, copy=False).ravel()
    if kind in "fO":  # floats, or integers numpy could not fit one dtype (int64 and uint64 mixed)
        raw = _exact_integers(name, datatype, data)
    elif kind not in "iu":
        raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
    info = np.iinfo(target)
    lo, hi = raw.min(), raw.max()
    if lo < info.min or hi > info.max:
        raise InvalidInput(
            f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}], got {lo}..{hi}"
        )
    return raw.astype(target, copy=False).ravel()


def _exact_integers(name: str, datatype: str, data: list[Any]) -> np.ndarray:
    """Re-read JSON values numpy turned into floats or objects (int64 and uint64 mixed, or
    non-integers): all must be integers that fit in 64 bits (the datatype's range is checked
    by the caller)."""
    values = np.asarray(data, dtype=object).ravel().tolist()
    for v in values:
        if type(v) is not int:
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers, got {v!r:.40}")
    lo, hi = min(values), max(values)
    if lo < -(2**63) or hi >= 2**64 or (lo < 0 and hi >= 2**63):
        raise InvalidInput(f"input {name!r}: {datatype} values {lo}..{hi} do not fit the datatype")
    return np.array(values, dtype=np.int64 if lo < 0 else np.uint64)


def _flatten_strings(name: str, data: list[Any]) -> list[bytes]:
    out: list[bytes] = []
    stack: list[tuple[list[Any], int]] = [(data, 0)]
    while stack:
        items, depth = stack.pop()
        for item in reversed(items):
            if isinstance(item, list):
                if depth + 1 >= MAX_DIMS:
                    raise InvalidInput(f"input {name!r}: 'data' is nested too deeply")
                stack.append((item, depth + 1))
            elif isinstance(item, str):
                out.append(item.encode())
            else:
                raise InvalidInput(f"input {name!r}: BYTES data must be strings, got {_kind(item)}")
    out.reverse()
    return out


def _requested_outputs(value: object) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a list, got {_kind(value)}")
    if len(value) > MAX_TENSORS:
        raise InvalidInput(f"'outputs' lists {len(value)} tensors; at most {MAX_TENSORS} are allowed")
    out: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise InvalidInput(f"outputs[{i}] must be a JSON object, got {_kind(raw)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{i}]: 'name' must be a non-empty string")
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested twice")
        seen.add(name)
        params = _parameters(raw.get("parameters"), f"output {name!r}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output {name!r}: binary_data must be true or false, got {binary!r:.40}")
        if params.get("classification", 0) not in (0, None):
            raise InvalidInput(f"output {name!r}: the classification extension is not supported")
        out.append(RequestedOutput(name, binary))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# encoding


def encode_response(
    config: ModelConfig,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """The response to `request` with the model's `outputs` (what the engine returned).

    Outputs come in the request's order, or the model's when the request names none.
    """
    tensors: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for spec, array, want_binary in selected_outputs(config, request, outputs):
        binary = request.binary_output if want_binary is None else want_binary
        tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if binary:
            data = tensor_bytes(spec, array)
            tensor["parameters"] = {"binary_data_size": len(data)}
            buffers.append(data)
        else:
            tensor["data"] = _json_of(spec, array)
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": config.name, "model_version": config.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not buffers:
        return EncodedResponse(header, None)
    return EncodedResponse(b"".join([header, *buffers]), len(header))


def selected_outputs(
    config: ModelConfig, request: InferRequest, outputs: Mapping[str, np.ndarray]
) -> list[tuple[TensorSpec, np.ndarray, bool | None]]:
    """(spec, array, binary as requested) of each output to return: in the request's order, or
    the model's when the request names none. InferenceFailed if the model did not return one."""
    specs = {s.name: s for s in config.outputs}
    if request.outputs is None:
        wanted = [RequestedOutput(s.name) for s in config.outputs]
    else:
        wanted = list(request.outputs)
    selected = []
    for want in wanted:
        array = outputs.get(want.name)
        if array is None:
            raise InferenceFailed(f"{config.id}: the model returned no output {want.name!r}")
        selected.append((specs[want.name], array, want.binary))
    return selected


def tensor_bytes(spec: TensorSpec, array: np.ndarray) -> memoryview:
    """An output's binary form (the inverse of `tensor_from_bytes`)."""
    if spec.datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return memoryview(b"".join(parts))
    flat = np.ascontiguousarray(array, dtype=DTYPES[spec.datatype]).reshape(-1)
    return flat.view(np.uint8).data


def _json_of(spec: TensorSpec, array: np.ndarray) -> list[Any]:
    if spec.datatype == "BYTES":
        try:
            return [b.decode() if isinstance(b, bytes) else str(b) for b in array.ravel()]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {spec.name!r} holds bytes that are not UTF-8; request it with binary_data"
            ) from None
    values = (
        bf16_bits_to_float(array) if spec.datatype == "BF16" else np.asarray(array, DTYPES[spec.datatype])
    )
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidInput(
            f"output {spec.name!r} holds NaN or infinity, which JSON cannot carry; request it with "
            "binary_data (binary tensor data carries every float)"
        )
    return values.ravel().tolist()


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------
# metadata


def model_metadata(config: ModelConfig, versions: Sequence[str]) -> dict[str, Any]:
    """The v2 model metadata response; shapes include the batch dimension (-1)."""
    return {
        "name": config.name,
        "versions": list(versions),
        "platform": PLATFORMS.get(config.format, config.format),
        "inputs": [_tensor_metadata(s) for s in config.inputs],
        "outputs": [_tensor_metadata(s) for s in config.outputs],
    }


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def triton_model_config(config: ModelConfig) -> dict[str, Any]:
    """Triton's model configuration extension (`GET .../config`), from our model.yaml."""

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "data_type": _TRITON_TYPES[spec.datatype], "dims": list(spec.shape)}

    return {
        "name": config.name,
        "platform": PLATFORMS.get(config.format, config.format),
        "backend": config.format,
        "version_policy": {"specific": {"versions": [config.version]}},
        "max_batch_size": config.max_batch_size,
        "input": [tensor(s) for s in config.inputs],
        "output": [tensor(s) for s in config.outputs],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(config.max_queue_delay_s * 1e6),
            "default_priority_level": int(config.priority) + 1,
            "priority_levels": len(Priority),
        },
        "parameters": {k: {"string_value": v} for k, v in sorted(config.parameters.items())},
    }
