"""KServe v2 tensors over gRPC: `ModelInferRequest` -> `InferRequest`, outputs -> `ModelInferResponse`.

Pure: protobuf messages in and out, no I/O. The decoded request is the same `v2_codec.InferRequest`
HTTP decodes to, and tensors go through `v2_codec`'s helpers, so both protocols run one path
(`api.infer`) and a tensor means the same on both.

Inputs come either all as `raw_input_contents` (one entry per input, in order: little-endian,
row-major; BYTES elements each a 4-byte little-endian length and that many bytes) or each in
its `contents` field of its datatype (FP16 and BF16 have none: raw only), never mixed, as
Triton requires. Outputs are always returned as `raw_output_contents` (Triton's default, and
what tritonclient.grpc reads), in the request's order or the model's.

Invariant: as with HTTP, decoding allocates in proportion to the message, never to what a
shape claims (raw sizes must equal shape x item size; typed contents must hold exactly the
shape's element count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format

from node_agent.errors import InvalidInput
from node_agent.serving import v2_codec
from node_agent.serving.proto import grpc_service_pb2 as pb
from node_agent.serving.statistics import Duration, ModelStatistics
from node_agent.types import ModelConfig

CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
"""v2 datatype -> the `InferTensorContents` field that carries it (the protocol's table)."""


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The value an `InferParameter` holds (None when none is set)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters(entries: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in entries.items()}


def decode_infer(message: pb.ModelInferRequest) -> v2_codec.InferRequest:
    """The request as `v2_codec.InferRequest` (InvalidInput naming what is wrong)."""
    if not message.inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    if len(message.inputs) > v2_codec.MAX_TENSORS:
        raise InvalidInput(
            f"'inputs' lists {len(message.inputs)} tensors; at most {v2_codec.MAX_TENSORS} are allowed"
        )
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "give one per input, in the order of 'inputs'"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name or len(name) > v2_codec.MAX_NAME_LEN:
            raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string, got {name!r:.80}")
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        datatype = v2_codec.check_datatype(name, tensor.datatype)
        shape = v2_codec.check_shape(name, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r} has 'contents' although the request has raw_input_contents"
                )
            inputs[name] = v2_codec.tensor_from_bytes(name, datatype, shape, memoryview(raw[i]))
        else:
            inputs[name] = _from_contents(name, datatype, shape, tensor.contents)
        datatypes[name] = datatype
    return v2_codec.InferRequest(
        id=message.id or None,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(message.outputs),
        binary_output=True,
        parameters=parameters(message.parameters),
    )


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {count} values, {field} has {len(values)}"
        )
    if datatype == "BYTES":
        return v2_codec.object_array(list(values), shape)
    dtype = v2_codec.DTYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 4 and count:  # carried in 32-bit fields
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _requested_outputs(
    outputs: Any,
) -> tuple[v2_codec.RequestedOutput, ...] | None:
    if not outputs:
        return None
    if len(outputs) > v2_codec.MAX_TENSORS:
        raise InvalidInput(
            f"'outputs' lists {len(outputs)} tensors; at most {v2_codec.MAX_TENSORS} are allowed"
        )
    seen: set[str] = set()
    for i, out in enumerate(outputs):
        if not out.name:
            raise InvalidInput(f"outputs[{i}]: 'name' must be a non-empty string")
        if out.name in seen:
            raise InvalidInput(f"output {out.name!r} is requested twice")
        seen.add(out.name)
        if parameters(out.parameters).get("classification", 0) not in (0, None):
            raise InvalidInput(f"output {out.name!r}: the classification extension is not supported")
    return tuple(v2_codec.RequestedOutput(out.name) for out in outputs)


def encode_infer(
    config: ModelConfig, request: v2_codec.InferRequest, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    """The response to `request` with the model's `outputs`, every tensor in raw form."""
    response = pb.ModelInferResponse(
        model_name=config.name, model_version=config.version, id=request.id or ""
    )
    for spec, array, _binary in v2_codec.selected_outputs(config, request, outputs):
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        response.raw_output_contents.append(bytes(v2_codec.tensor_bytes(spec, array)))
    return response


def model_metadata(doc: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """`v2_codec.model_metadata`'s document as the protocol's message."""
    response = pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"])
    for key in ("inputs", "outputs"):
        for tensor in doc[key]:
            getattr(response, key).add(
                name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
            )
    return response


def model_config(doc: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """`v2_codec.triton_model_config`'s document (what HTTP's .../config answers) as Triton's
    message. Triton's versions are integers: a version that is not (e.g. '2-canary') leaves
    `version_policy` out of the message (HTTP's JSON still names it)."""
    doc = dict(doc)
    versions = doc.get("version_policy", {}).get("specific", {}).get("versions", [])
    if not all(isinstance(v, str) and v.isdigit() for v in versions):
        doc.pop("version_policy", None)
    return pb.ModelConfigResponse(config=json_format.ParseDict(doc, pb.ModelConfig()))


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(stats: Sequence[ModelStatistics]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for s in stats:
        entry = response.model_stats.add(
            name=s.name,
            version=s.version,
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        i = entry.inference_stats
        i.success.CopyFrom(_duration(s.success))
        i.fail.CopyFrom(_duration(s.fail))
        i.queue.CopyFrom(_duration(s.queue))
        i.compute_infer.CopyFrom(_duration(s.compute_infer))
    return response
