"""v2_codec: KServe v2 JSON and Triton binary tensor decoding/encoding (pure, no server).

tritonclient's own request encoder and response parser are the reference: what it writes
must decode to the same arrays, and what we write must parse back in it.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from edgefleet_api.types import Priority
from node_agent.errors import InferenceFailed, InvalidInput
from node_agent.serving.v2_codec import (
    DATATYPES,
    DTYPES,
    InferRequest,
    RequestedOutput,
    bf16_bits_to_float,
    check_request,
    decode_request,
    encode_response,
    float_to_bf16_bits,
    model_metadata,
    parse_header_length,
    priority_from,
    timeout_s_from,
    triton_model_config,
)
from node_agent.types import ModelConfig, TensorSpec

NUMERIC = sorted(dt for dt in DTYPES if dt != "BF16")


def config(inputs: list[TensorSpec], outputs: list[TensorSpec], **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="m",
        version="1",
        format="torchscript",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        artifact="model.pt",
        digest="sha256:" + "0" * 64,
        **kw,
    )


def triton_body(inputs: list[InferInput], **kw: Any) -> tuple[bytearray, int | None]:
    body, json_size = InferenceServerClient.generate_request_body(inputs, **kw)
    return bytearray(body), json_size


def request_json(*inputs: dict[str, Any], **top: Any) -> bytearray:
    return bytearray(json.dumps({"inputs": list(inputs), **top}).encode())


# --- decoding what tritonclient sends ---------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_datatype_from_tritonclient(datatype: str, binary: bool) -> None:
    rng = np.random.default_rng(len(datatype))
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        x = rng.random((2, 3)) > 0.5
    elif dtype.kind == "f":
        x = rng.standard_normal((2, 3)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=dtype)
    inp = InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    body, size = triton_body([inp])
    assert (size is not None) == binary
    request = decode_request(body, size)
    got = request.inputs["x"]
    assert got.dtype == dtype and got.shape == (2, 3)
    np.testing.assert_array_equal(got, x)
    assert request.datatypes == {"x": datatype}


def test_several_inputs_bytes_and_parameters_from_tritonclient() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = np.array([b"hello", b"", "wörld".encode()], dtype=object)
    ia, ib, ic = InferInput("a", [3, 4], "FP32"), InferInput("s", [3], "BYTES"), InferInput("j", [3], "BYTES")
    ia.set_data_from_numpy(a)
    ib.set_data_from_numpy(s)
    ic.set_data_from_numpy(s, binary_data=False)
    out = [InferRequestedOutput("y", binary_data=False), InferRequestedOutput("z")]
    body, size = triton_body([ia, ib, ic], outputs=out, request_id="r-1", priority=2, timeout=1500)
    request = decode_request(body, size)
    np.testing.assert_array_equal(request.inputs["a"], a)
    assert request.inputs["s"].tolist() == s.tolist() == request.inputs["j"].tolist()
    assert request.id == "r-1"
    assert request.outputs == (RequestedOutput("y", False), RequestedOutput("z", True))
    assert priority_from(request.parameters.get("priority"), Priority.NORMAL) is Priority.HIGH
    assert timeout_s_from(request.parameters.get("timeout")) == pytest.approx(0.0015)
    assert not request.binary_output


def test_no_outputs_named_means_all_in_binary_as_tritonclient_asks() -> None:
    inp = InferInput("x", [1], "INT32")
    inp.set_data_from_numpy(np.array([7], dtype=np.int32))
    request = decode_request(*triton_body([inp]))
    assert request.outputs is None and request.binary_output is True


def test_binary_inputs_are_aligned_writable_arrays() -> None:
    x = np.arange(5, dtype=np.float64)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [5],
                                     "parameters": {"binary_data_size": 40}}]}).encode()  # fmt: skip
    for pad in range(8):  # every alignment of the binary part
        head = header + b" " * pad
        got = decode_request(bytearray(head + x.tobytes()), len(head)).inputs["x"]
        np.testing.assert_array_equal(got, x)
        assert got.flags.aligned and got.flags.writeable
        torch.from_numpy(got)  # torch accepts it (no read-only / misalignment warning path)


def test_json_data_may_be_nested_or_flat() -> None:
    nested = request_json({"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]})
    flat = request_json({"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [1, 2, 3, 4]})
    for body in (nested, flat):
        np.testing.assert_array_equal(decode_request(body).inputs["x"], [[1, 2], [3, 4]])


# --- BF16 -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(width=32, allow_nan=False)))
def test_bf16_rounding_matches_torch(values: np.ndarray) -> None:
    ours = float_to_bf16_bits(values)
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    exact = bf16_bits_to_float(ours)
    np.testing.assert_array_equal(exact, torch.from_numpy(values.copy()).to(torch.bfloat16).float().numpy())


def test_bf16_json_in_and_out() -> None:
    body = request_json({"name": "x", "datatype": "BF16", "shape": [3], "data": [1.0, -2.5, float("nan")]})
    request = decode_request(body)
    bits = request.inputs["x"]
    assert bits.dtype == np.uint16 and bits[:2].tolist() == [0x3F80, 0xC020] and bits[2] == 0x7FC0
    cfg = config([TensorSpec("x", "BF16", (-1,))], [TensorSpec("y", "BF16", (2,))])
    resp = encode_response(cfg, request, {"y": bits[:2].reshape(1, 2)})
    assert json.loads(resp.body)["outputs"][0]["data"] == [1.0, -2.5]


# --- malformed requests -----------------------------------------------------------------

X = {"name": "x", "datatype": "FP32", "shape": [2]}

MALFORMED: list[tuple[str, bytes, int | None, str]] = [
    ("not json", b"{nope", None, "not valid JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', None, "not valid UTF-8"),
    ("deeply nested", b"[" * 50000, None, "nested too deeply"),
    ("a list", b"[]", None, "must be a JSON object"),
    ("no inputs", b"{}", None, "'inputs' must be a non-empty list"),
    ("input not object", b'{"inputs": [3]}', None, "inputs[0] must be a JSON object"),
    ("no name", b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', None, "'name'"),
    ("bad datatype", json.dumps({"inputs": [{**X, "datatype": "FP8", "data": [1, 2]}]}).encode(),
     None, "unknown datatype 'FP8'"),
    ("negative dim", json.dumps({"inputs": [{**X, "shape": [-1], "data": [1]}]}).encode(), None,
     "not an integer >= 0"),
    ("shape not list", json.dumps({"inputs": [{**X, "shape": 2, "data": [1, 2]}]}).encode(), None,
     "'shape' must be a list"),
    ("too few values", json.dumps({"inputs": [{**X, "data": [1]}]}).encode(), None,
     "needs 2 values, 'data' has 1"),
    ("ragged", json.dumps({"inputs": [{**X, "data": [[1], [2, 3]]}]}).encode(), None,
     "evenly nested"),
    ("strings for FP32", json.dumps({"inputs": [{**X, "data": ["1", "2"]}]}).encode(), None,
     "FP32 data must be numbers"),
    ("null values", json.dumps({"inputs": [{**X, "data": [None, 1]}]}).encode(), None, "must be numbers"),
    ("fractions for INT8", json.dumps({"inputs": [{**X, "datatype": "INT8", "data": [1.5, 2]}]}).encode(),
     None, "must be integers, got 1.5"),
    ("INT8 out of range", json.dumps({"inputs": [{**X, "datatype": "INT8", "data": [1, 300]}]}).encode(),
     None, "must lie in [-128, 127]"),
    ("numbers for BOOL", json.dumps({"inputs": [{**X, "datatype": "BOOL", "data": [1, 0]}]}).encode(),
     None, "true/false"),
    ("no data", json.dumps({"inputs": [X]}).encode(), None, "has no 'data'"),
    ("duplicate input", json.dumps({"inputs": [{**X, "data": [1, 2]}] * 2}).encode(), None, "given twice"),
    ("data and binary", json.dumps({"inputs": [{**X, "data": [1, 2], "parameters": {"binary_data_size": 8}}]}
                                   ).encode(), None, "both 'data' and"),
    ("binary without header length", json.dumps({"inputs": [{**X, "parameters": {"binary_data_size": 8}}]}
                                                ).encode(), None, "Inference-Header-Content-Length"),
    ("bad binary_data_output", json.dumps({"inputs": [{**X, "data": [1, 2]}],
                                           "parameters": {"binary_data_output": "yes"}}).encode(), None,
     "binary_data_output"),
    ("id not string", json.dumps({"id": 5, "inputs": [{**X, "data": [1, 2]}]}).encode(), None,
     "'id' must be a string"),
    ("outputs not list", json.dumps({"inputs": [{**X, "data": [1, 2]}], "outputs": {}}).encode(), None,
     "'outputs' must be a list"),
    ("classification", json.dumps({"inputs": [{**X, "data": [1, 2]}],
                                   "outputs": [{"name": "y", "parameters": {"classification": 2}}]}).encode(),
     None, "classification extension"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "header_length", "message"),
                         [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])  # fmt: skip
def test_malformed_json_requests_name_the_problem(
    body: bytes, header_length: int | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=None) as info:
        decode_request(bytearray(body), header_length)
    assert message in str(info.value)


def binary_request(inputs: list[dict[str, Any]], blob: bytes) -> tuple[bytearray, int]:
    header = json.dumps({"inputs": inputs}).encode()
    return bytearray(header + blob), len(header)


BIN = {"name": "x", "datatype": "FP32", "shape": [2]}


@pytest.mark.parametrize(
    ("inputs", "blob", "message"),
    [
        ([{**BIN, "parameters": {"binary_data_size": 4}}], b"\0" * 4, "needs 8 bytes (2 x 4)"),
        ([{**BIN, "parameters": {"binary_data_size": 8}}], b"\0" * 4, "only 4 bytes of binary data remain"),
        ([{**BIN, "parameters": {"binary_data_size": 8}}], b"\0" * 12, "4 bytes of binary data after"),
        ([{**BIN, "parameters": {"binary_data_size": -8}}], b"", "integer >= 0"),
        ([{**BIN, "parameters": {"binary_data_size": True}}], b"", "integer >= 0"),
        ([{**BIN, "datatype": "BOOL", "parameters": {"binary_data_size": 2}}], b"\0\2", "0 or 1"),
        ([{**BIN, "datatype": "BYTES", "parameters": {"binary_data_size": 6}}], b"\5\0\0\0ab",
         "runs past its data"),
        ([{**BIN, "datatype": "BYTES", "parameters": {"binary_data_size": 7}}], b"\1\0\0\0a\0\0",
         "inside an element's 4-byte length"),
        ([{**BIN, "datatype": "BYTES", "parameters": {"binary_data_size": 5}}], b"\1\0\0\0a",
         "needs 2 BYTES elements, the binary data holds 1"),
    ],
)  # fmt: skip
def test_malformed_binary_requests_name_the_problem(
    inputs: list[dict[str, Any]], blob: bytes, message: str
) -> None:
    body, size = binary_request(inputs, blob)
    with pytest.raises(InvalidInput) as info:
        decode_request(body, size)
    assert message in str(info.value)


def test_header_length_past_the_body_and_bad_header_values() -> None:
    with pytest.raises(InvalidInput, match="body has only 2 bytes"):
        decode_request(bytearray(b"{}"), 10)
    for bad in ("-1", "1.5", "abc", "١٢", "9" * 30):
        with pytest.raises(InvalidInput, match="non-negative integer"):
            parse_header_length(bad)
    assert parse_header_length(" 12 ") == 12 and parse_header_length(None) is None


def test_a_shape_cannot_make_the_decoder_allocate_more_than_the_body() -> None:
    huge = [1 << 20, 1 << 20, 1 << 20]
    with pytest.raises(InvalidInput, match="needs"):
        decode_request(*binary_request([{"name": "x", "datatype": "FP32", "shape": huge,
                                         "parameters": {"binary_data_size": 8}}], b"\0" * 8))  # fmt: skip
    with pytest.raises(InvalidInput, match="needs 1152921504606846976 values, 'data' has 1"):
        decode_request(request_json({"name": "x", "datatype": "FP32", "shape": huge, "data": [1]}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 400)))
def test_random_bytes_either_decode_or_raise_invalid_input(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(InvalidInput):
        decode_request(bytearray(body), header_length)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8,
)


def either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's valid values or any JSON value."""
    return valid | json_values


def some_of(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: either(v) for k, v in fields.items()})


values = st.integers(-3, 300) | st.floats() | st.text(max_size=2) | st.booleans()
tensors = some_of(
    name=st.sampled_from(["x", "y"]),
    datatype=st.sampled_from(sorted(DATATYPES)),
    shape=st.lists(st.integers(-1, 4), max_size=3),
    data=st.lists(values | st.lists(values, max_size=3), max_size=12),
    parameters=some_of(binary_data_size=st.integers(-1, 64)),
)
documents = some_of(
    inputs=st.lists(tensors, max_size=3),
    outputs=st.lists(some_of(name=st.text(max_size=3),
                             parameters=some_of(binary_data=st.booleans(), classification=st.integers(0, 2))),
                     max_size=2),
    parameters=some_of(binary_data_output=st.booleans()),
    id=st.text(max_size=3),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(documents, st.binary(max_size=64), st.booleans())
def test_random_json_documents_either_decode_or_raise_invalid_input(
    doc: Any, tail: bytes, binary: bool
) -> None:
    """Documents shaped like requests, every field valid or random, so many get deep into
    the decoder."""
    header = json.dumps(doc).encode()
    with contextlib.suppress(InvalidInput):
        request = decode_request(
            bytearray(header + tail if binary else header), len(header) if binary else None
        )
        for array in request.inputs.values():
            assert isinstance(array, np.ndarray)


# --- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, Priority.LOW), (0, Priority.LOW), (1, Priority.CRITICAL), (2, Priority.HIGH),
     (3, Priority.NORMAL), (4, Priority.LOW), (1000, Priority.LOW), ("critical", Priority.CRITICAL),
     (" High ", Priority.HIGH), ("NORMAL", Priority.NORMAL), ("low", Priority.LOW)],
)  # fmt: skip
def test_priority_follows_triton_levels_and_our_names(value: object, expected: Priority) -> None:
    # the model's default here is LOW, so 0/None (Triton's "default level") must give LOW
    assert priority_from(value, Priority.LOW) is expected


@pytest.mark.parametrize("value", [-1, True, 1.0, "urgent", [1], {"a": 1}])
def test_bad_priorities_are_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="priority"):
        priority_from(value, Priority.NORMAL)


def test_timeout_is_microseconds_and_zero_means_none() -> None:
    assert timeout_s_from(None) is None and timeout_s_from(0) is None
    assert timeout_s_from(250_000) == 0.25 and timeout_s_from(1.5) == 1.5e-6
    for bad in (-1, "10", True, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="timeout"):
            timeout_s_from(bad)


# --- checks against the model and encoding ----------------------------------------------

CLASSIFIER = config([TensorSpec("image", "FP32", (3, 4))],
                    [TensorSpec("logits", "FP32", (2,)), TensorSpec("ids", "INT64", (2,))])  # fmt: skip


def test_check_request_refuses_other_datatypes_and_unknown_outputs() -> None:
    fp64 = decode_request(request_json({"name": "image", "datatype": "FP64", "shape": [1, 1], "data": [1]}))
    with pytest.raises(InvalidInput, match="input 'image' has datatype FP64, but the model takes FP32"):
        check_request(fp64, CLASSIFIER)
    unknown = decode_request(request_json({"name": "image", "datatype": "FP32", "shape": [1], "data": [1]},
                                           outputs=[{"name": "probs"}]))  # fmt: skip
    with pytest.raises(InvalidInput, match="unknown output 'probs'; the model's outputs are 'logits', 'ids'"):
        check_request(unknown, CLASSIFIER)


def outputs_of_classifier() -> dict[str, np.ndarray]:
    return {"logits": np.array([[0.5, -1.0], [2.0, 3.0]], np.float32),
            "ids": np.array([[1, 2], [3, 4]], np.int64)}  # fmt: skip


def request_for(outputs: tuple[RequestedOutput, ...] | None, binary_output: bool) -> InferRequest:
    return InferRequest("req-7", {}, {}, outputs, binary_output, {})


@pytest.mark.parametrize("binary_output", [True, False])
def test_responses_parse_back_in_tritonclient(binary_output: bool) -> None:
    outs = outputs_of_classifier()
    resp = encode_response(CLASSIFIER, request_for(None, binary_output), outs)
    assert (resp.header_length is not None) == binary_output
    result = InferenceServerClient.parse_response_body(resp.body, header_length=resp.header_length)
    for name, array in outs.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)
        assert result.as_numpy(name).dtype == array.dtype
    header = result.get_response()
    assert header["model_name"] == "m" and header["model_version"] == "1" and header["id"] == "req-7"
    assert [o["name"] for o in header["outputs"]] == ["logits", "ids"]


def test_requested_outputs_come_in_request_order_each_in_its_own_encoding() -> None:
    wanted = (RequestedOutput("ids", binary=False), RequestedOutput("logits"))
    resp = encode_response(CLASSIFIER, request_for(wanted, binary_output=True), outputs_of_classifier())
    assert resp.header_length is not None
    header = json.loads(resp.body[: resp.header_length])
    assert [o["name"] for o in header["outputs"]] == ["ids", "logits"]
    assert header["outputs"][0]["data"] == [1, 2, 3, 4]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    assert resp.body[resp.header_length :] == outputs_of_classifier()["logits"].tobytes()


def test_bytes_outputs_in_both_encodings() -> None:
    cfg = config([TensorSpec("x", "FP32", (1,))], [TensorSpec("s", "BYTES", (1,))])
    s = np.array([[b"ab"], [b""]], dtype=object)
    binary = encode_response(cfg, request_for(None, True), {"s": s})
    assert binary.body[binary.header_length :] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    as_json = encode_response(cfg, request_for(None, False), {"s": s})
    assert json.loads(as_json.body)["outputs"][0]["data"] == ["ab", ""]
    with pytest.raises(InvalidInput, match="not UTF-8"):
        encode_response(cfg, request_for(None, False), {"s": np.array([[b"\xff"]], dtype=object)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_outputs_are_never_bare_json_and_travel_as_binary(bad: float) -> None:
    outs = outputs_of_classifier()
    outs["logits"][1, 1] = bad
    with pytest.raises(
        InvalidInput, match="NaN or infinity, which JSON cannot carry; request it with binary_data"
    ):
        encode_response(CLASSIFIER, request_for(None, False), outs)
    resp = encode_response(CLASSIFIER, request_for(None, True), outs)
    assert resp.header_length is not None
    json.loads(resp.body[: resp.header_length], parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    got = np.frombuffer(resp.body[resp.header_length : resp.header_length + 16], np.float32)
    np.testing.assert_array_equal(got, outs["logits"].ravel())


def test_a_missing_model_output_is_an_inference_failure() -> None:
    with pytest.raises(InferenceFailed, match="no output 'ids'"):
        encode_response(CLASSIFIER, request_for(None, False), {"logits": np.zeros((1, 2), np.float32)})


def test_metadata_and_triton_config() -> None:
    meta = model_metadata(CLASSIFIER, ["1", "2"])
    assert meta == {
        "name": "m", "versions": ["1", "2"], "platform": "pytorch_libtorch",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "ids", "datatype": "INT64", "shape": [-1, 2]}],
    }  # fmt: skip
    triton = triton_model_config(CLASSIFIER)
    assert triton["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [3, 4]}]
    assert triton["max_batch_size"] == 8
    assert triton["dynamic_batching"]["default_priority_level"] == 3  # NORMAL = Triton level 3
