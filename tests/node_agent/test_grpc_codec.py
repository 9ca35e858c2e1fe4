"""gRPC tensors <-> the common request: typed contents, raw contents, parameters (pure)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from node_agent.errors import InvalidInput
from node_agent.serving import grpc_codec
from node_agent.serving.proto import grpc_service_pb2 as pb
from node_agent.types import ModelConfig, TensorSpec


def request_with(datatype: str, shape: list[int], **contents: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [1.5, -2.25], np.float32),
        ("FP64", "fp64_contents", [1e300, -1e-300], np.float64),
    ],
)
def test_typed_contents_decode_to_their_dtype(
    datatype: str, field: str, values: list[object], dtype: type
) -> None:
    decoded = grpc_codec.decode_infer(request_with(datatype, [1, 2], **{field: values}))
    array = decoded.inputs["x"]
    assert array.dtype == np.dtype(dtype) and array.shape == (1, 2)
    assert array.ravel().tolist() == values and decoded.datatypes == {"x": datatype}


def test_typed_contents_are_checked() -> None:
    with pytest.raises(InvalidInput, match=r"INT8 values must lie in \[-128, 127\]"):
        grpc_codec.decode_infer(request_with("INT8", [1], int_contents=[200]))
    with pytest.raises(InvalidInput, match="needs 4 values, fp32_contents has 3"):
        grpc_codec.decode_infer(request_with("FP32", [2, 2], fp32_contents=[1.0, 2.0, 3.0]))
    with pytest.raises(InvalidInput, match="BF16 has no typed contents"):
        grpc_codec.decode_infer(request_with("BF16", [1], fp32_contents=[1.0]))


def test_raw_bytes_tensors_are_length_prefixed() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0))
    assert grpc_codec.decode_infer(request).inputs["x"].tolist() == [b"hi", b""]
    request.raw_input_contents[0] = struct.pack("<I", 9) + b"hi"
    with pytest.raises(InvalidInput, match="runs past its data"):
        grpc_codec.decode_infer(request)


def test_parameters_and_the_request_id() -> None:
    request = request_with("FP32", [1], fp32_contents=[1.0])
    request.id = "r-7"
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 1000
    request.parameters["flag"].bool_param = True
    request.parameters["name"].string_param = "low"
    request.parameters["ratio"].double_param = 0.5
    decoded = grpc_codec.decode_infer(request)
    assert decoded.id == "r-7"
    assert decoded.parameters == {"priority": 2, "timeout": 1000, "flag": True, "name": "low", "ratio": 0.5}
    assert grpc_codec.parameter_value(pb.InferParameter()) is None


def test_outputs_are_encoded_raw_in_the_requested_order() -> None:
    config = ModelConfig(
        name="m", version="1", format="torchscript",
        inputs=(TensorSpec("x", "FP32", (1,)),),
        outputs=(TensorSpec("a", "FP32", (2,)), TensorSpec("b", "BYTES", (1,))),
        artifact="model.pt", digest="sha256:" + "0" * 64,
    )  # fmt: skip
    request = request_with("FP32", [1, 1], fp32_contents=[1.0])
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    decoded = grpc_codec.decode_infer(request)
    b = np.empty((1, 1), dtype=object)
    b[0, 0] = b"ok"
    response = grpc_codec.encode_infer(config, decoded, {"a": np.array([[1.0, 2.0]], np.float32), "b": b})
    got = [(o.name, o.datatype, list(o.shape)) for o in response.outputs]
    assert got == [("b", "BYTES", [1, 1]), ("a", "FP32", [1, 2])]
    assert response.raw_output_contents[0] == struct.pack("<I", 2) + b"ok"
    assert np.frombuffer(response.raw_output_contents[1], "<f4").tolist() == [1.0, 2.0]
    twice = request_with("FP32", [1, 1], fp32_contents=[1.0])
    twice.outputs.add(name="a")
    twice.outputs.add(name="a")
    with pytest.raises(InvalidInput, match="requested twice"):
        grpc_codec.decode_infer(twice)
