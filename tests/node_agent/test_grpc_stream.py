"""The KServe v2 / Triton gRPC RPCs beyond unary inference: ModelConfig, ModelStatistics and
ModelStreamInfer, against real agents on 127.0.0.1 serving the example models, through
`tritonclient.grpc` and its raw stubs. Invariants: every request on a stream gets exactly one
answer (outputs, or a one-line `error_message`) and one bad request never ends the stream;
ModelConfig and ModelStatistics say what HTTP's .../config and .../stats say.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from agent_runner import RunningAgent
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from node_agent.agent import AgentSettings
from node_agent.serving.grpc_server import GrpcSettings
from node_agent.serving.http import HttpSettings

TOKEN = "s3cret-token"
Code = grpc.StatusCode


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def start(repo: Path, http: HttpSettings | None = None) -> RunningAgent:
    http = http or HttpSettings(host="127.0.0.1", port=0)
    return RunningAgent(
        AgentSettings(repo, workers=1, http=http, grpc=GrpcSettings(host="127.0.0.1", port=0))
    )


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grpc-stream") / "models"
    shutil.copytree(example_repo, root)
    return root


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[RunningAgent]:
    running = start(repo)
    yield running
    running.close()


@pytest.fixture(scope="module")
def locked(repo: Path) -> Iterator[RunningAgent]:
    """Auth on; requests of at most 64 KiB."""
    http = HttpSettings(host="127.0.0.1", port=0, auth_token=TOKEN, max_request_bytes=64 * 1024)
    running = start(repo, http)
    yield running
    running.close()


def target(running: RunningAgent) -> str:
    assert running.agent.grpc_port
    return f"127.0.0.1:{running.agent.grpc_port}"


@pytest.fixture()
def client(served: RunningAgent) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(target(served))
    yield c
    c.close()


@pytest.fixture()
def stub(served: RunningAgent) -> Iterator[tpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(target(served)) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def http_get(running: RunningAgent, path: str) -> Any:
    with urllib.request.urlopen(f"http://{running.url}{path}", timeout=30) as r:
        return json.loads(r.read())


def raw_request(x: np.ndarray, model: str = "classifier", version: str = "1", id: str = "") -> Any:
    request = tpb.ModelInferRequest(model_name=model, model_version=version, id=id)
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def dims_as_ints(config: dict[str, Any]) -> dict[str, Any]:
    """protobuf's JSON writes int64 as strings; HTTP's document has numbers."""
    for key in ("input", "output"):
        for tensor in config.get(key, []):
            tensor["dims"] = [int(d) for d in tensor["dims"]]
    return config


# --- ModelConfig --------------------------------------------------------------------------


def test_model_config_is_the_http_config(served: RunningAgent, client: tgrpc.InferenceServerClient) -> None:
    got = dims_as_ints(client.get_model_config("classifier", "1", as_json=True)["config"])
    want = http_get(served, "/v2/models/classifier/versions/1/config")
    for doc in (got, want):  # integers as strings in protobuf's JSON
        dyn = doc["dynamic_batching"]
        for key in ("max_queue_delay_microseconds", "priority_levels", "default_priority_level"):
            dyn[key] = int(dyn.get(key, 0))
    assert got == want
    assert got["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [3, 64, 64]}]
    assert got["version_policy"] == {"specific": {"versions": ["1"]}}
    # Triton's versions are integers: '2-slow' is named by HTTP only
    slow = client.get_model_config("classifier", "2-slow").config
    assert slow.name == "classifier" and not slow.HasField("version_policy")
    assert http_get(served, "/v2/models/classifier/versions/2-slow/config")["version_policy"]
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as info:
        client.get_model_config("nope")
    assert info.value.status() == str(Code.NOT_FOUND)


# --- ModelStatistics ----------------------------------------------------------------------


def test_statistics_count_what_was_served(served: RunningAgent, client: tgrpc.InferenceServerClient) -> None:
    def stats(version: str) -> Any:
        (entry,) = client.get_inference_statistics("classifier", version).model_stats
        assert (entry.name, entry.version) == ("classifier", version)
        return entry

    before, failing_before = stats("1"), stats("2-failing")
    x = images(3, seed=1)
    inp = tgrpc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    t0 = time.time()
    for _ in range(4):
        client.infer("classifier", [inp], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer("classifier", [inp], model_version="2-failing")
    after, failing_after = stats("1"), stats("2-failing")
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count == s0.success.count + 4 and s1.success.ns > s0.success.ns
    assert s1.queue.count == s1.compute_infer.count == s1.success.count
    assert s1.compute_infer.ns > s0.compute_infer.ns and s1.queue.ns >= s0.queue.ns
    assert s1.success.ns >= s1.compute_infer.ns  # latency = queue + compute, per request
    assert after.inference_count == before.inference_count + 12  # rows
    assert before.execution_count < after.execution_count <= before.execution_count + 4  # batches
    assert s1.fail.count == s0.fail.count
    assert t0 * 1000 - 1 <= after.last_inference <= time.time() * 1000 + 1
    assert failing_after.inference_stats.fail.count == failing_before.inference_stats.fail.count + 1
    assert failing_after.inference_stats.success.count == failing_before.inference_stats.success.count
    assert failing_after.last_inference == failing_before.last_inference

    # every version of a model, every model; and the same document over HTTP
    versions = {e.version for e in client.get_inference_statistics("classifier").model_stats}
    assert versions == {"1", "2", "2-slow", "2-failing"}
    everything = {(e.name, e.version) for e in client.get_inference_statistics().model_stats}
    assert {("classifier", "1"), ("mlp", "1")} <= everything
    via_http = http_get(served, "/v2/models/classifier/versions/1/stats")["model_stats"][0]
    via_grpc = client.get_inference_statistics("classifier", "1", as_json=True)["model_stats"][0]

    def numbers(doc: dict[str, Any]) -> dict[str, int]:  # protobuf's JSON leaves zeros out
        flat = {k: int(doc.get(k, 0)) for k in ("last_inference", "inference_count", "execution_count")}
        for kind in via_http["inference_stats"]:
            d = doc["inference_stats"].get(kind, {})
            flat |= {f"{kind}.count": int(d.get("count", 0)), f"{kind}.ns": int(d.get("ns", 0))}
        return flat

    assert numbers(via_http) == numbers(via_grpc)
    assert {e["name"] for e in http_get(served, "/v2/models/stats")["model_stats"]} >= {"classifier", "mlp"}
    for name, version in (("nope", ""), ("classifier", "9")):
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics(name, version)
        assert info.value.status() == str(Code.NOT_FOUND)


# --- ModelStreamInfer ---------------------------------------------------------------------


def bad_shape() -> Any:
    request = raw_request(images(1, seed=2), id="bad-shape")
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1, 3, 32, 128])
    return request


def bad_datatype() -> Any:
    request = raw_request(images(1, seed=2), id="bad-datatype")
    request.inputs[0].datatype = "FLOAT"
    return request


def huge_claim() -> Any:
    """A shape claiming 2^40 elements, with 4 bytes: refused from the message's size."""
    request = raw_request(images(1, seed=2), id="huge-claim")
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1 << 20, 1 << 20])
    del request.raw_input_contents[:]
    request.raw_input_contents.append(b"\0\0\0\0")
    return request


HOSTILE: list[tuple[Any, str]] = [
    (raw_request(images(1, seed=2), model="nope", version="", id="unknown-model"), "no model named 'nope'"),
    (bad_shape(), "expected [-1, 3, 64, 64]"),
    (bad_datatype(), "unknown datatype 'FLOAT'"),
    (huge_claim(), "needs"),
    (raw_request(images(1, seed=2), version="2-failing", id="failing"), "fails on every batch"),
]


def streams_counted(running: RunningAgent, code: str) -> float:
    """edgefleet_grpc_requests_total{rpc="ModelStreamInfer", code} on the agent's /metrics."""
    with urllib.request.urlopen(f"http://{running.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "edgefleet_grpc_requests_total" and s.labels == {
                "rpc": "ModelStreamInfer",
                "code": code,
            }:
                return float(s.value)
    return 0.0


def test_a_stream_answers_every_request_and_survives_bad_ones(
    served: RunningAgent, stub: tpb_grpc.GRPCInferenceServiceStub
) -> None:
    """Good and hostile requests interleaved on one stream: one answer each, matched by id;
    errors as `error_message` (one line, no stack trace); outputs ModelInfer's; the
    stream ends OK when the client is done, and is counted once."""
    counted = streams_counted(served, "OK")
    goods = {f"good-{i}": images(1 + i % 3, seed=10 + i) for i in range(8)}
    requests = []
    for i, (rid, x) in enumerate(goods.items()):
        requests.append(raw_request(x, id=rid))
        if i < len(HOSTILE):
            requests.append(HOSTILE[i][0])
    call = stub.ModelStreamInfer(iter(requests), timeout=120)
    answers = {a.infer_response.id: a for a in call}
    assert call.code() == Code.OK
    assert sorted(answers) == sorted(r.id for r in requests)  # exactly one answer each
    for rid, x in goods.items():
        answer = answers[rid]
        assert answer.error_message == ""
        want = stub.ModelInfer(raw_request(x, id=rid))
        got_logits, want_logits = (
            np.frombuffer(r.raw_output_contents[0], np.float32) for r in (answer.infer_response, want)
        )
        # the stream's requests are batched together: equal up to float rounding of the batch
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-6)
        assert list(answer.infer_response.outputs[0].shape) == [x.shape[0], 10]
    for request, text in HOSTILE:
        message = answers[request.id].error_message
        assert text in message, message
        assert "Traceback" not in message and "\n" not in message
    assert streams_counted(served, "OK") == counted + 1


def test_tritonclient_streams_with_its_defaults(client: tgrpc.InferenceServerClient) -> None:
    """`start_stream` / `async_stream_infer`: results for good requests, an
    InferenceServerException for a bad one, in the callback; the stream goes on after it."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        x = images(2, seed=3)
        good = tgrpc.InferInput("image", list(x.shape), "FP32")
        good.set_data_from_numpy(x)
        wrong = tgrpc.InferInput("image", list(x.shape), "FP64")
        wrong.set_data_from_numpy(x.astype(np.float64))
        client.async_stream_infer("classifier", [good], model_version="1", request_id="a")
        client.async_stream_infer("classifier", [wrong], model_version="1", request_id="b")
        client.async_stream_infer("classifier", [good], model_version="1", request_id="c")
        got = [results.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
    outputs = [r.as_numpy("logits") for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(outputs) == 2 and outputs[0].tobytes() == outputs[1].tobytes()
    assert outputs[0].shape == (2, 10)
    assert len(errors) == 1 and "datatype FP64, but the model takes FP32" in str(errors[0])


def test_a_stream_needs_the_token_and_a_message_over_the_limit_ends_it_cleanly(
    locked: RunningAgent,
) -> None:
    """No token: UNAUTHENTICATED for the stream. A message over `max_request_bytes` is refused
    by gRPC itself (RESOURCE_EXHAUSTED, no stack trace): it cannot be skipped, so it ends the
    stream, after the requests before it were answered; a new stream serves again."""
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(target(locked)) as channel:
        stream = tpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
        call = stream(iter([raw_request(images(1, seed=4), id="x")]), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]

        small, big = images(1, seed=4), images(2, seed=4)  # 48 KiB, 96 KiB

        def requests() -> Iterator[Any]:
            yield raw_request(small, id="before")
            while not answered:  # the first is answered before the oversized one is sent
                time.sleep(0.01)
            yield raw_request(big, id="too-big")

        answered: list[Any] = []
        call = stream(requests(), metadata=auth, timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            for answer in call:
                answered.append(answer)
        error: Any = info.value
        assert error.code() == Code.RESOURCE_EXHAUSTED and "Traceback" not in error.details()
        assert [a.infer_response.id for a in answered] == ["before"] and not answered[0].error_message

        again = list(stream(iter([raw_request(small, id="after")]), metadata=auth, timeout=60))
        assert [a.infer_response.id for a in again] == ["after"] and not again[0].error_message


HOSTILE_NAMES = ["../classifier", "classifier/../../etc", "x" * 100_000, "\x00", "Classifier", " "]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["dotdot", "path", "huge", "nul", "upper", "space"])
def test_hostile_names_get_not_found_from_config_and_statistics(
    stub: tpb_grpc.GRPCInferenceServiceStub, name: str
) -> None:
    for call, request in (
        (stub.ModelConfig, tpb.ModelConfigRequest(name=name)),
        (stub.ModelStatistics, tpb.ModelStatisticsRequest(name=name)),
        (stub.ModelStatistics, tpb.ModelStatisticsRequest(name="classifier", version=name)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        error: Any = info.value
        assert error.code() == Code.NOT_FOUND, (error.code(), error.details()[:200])
        assert "Traceback" not in error.details() and "\n" not in error.details()
        assert len(error.details()) <= 2000  # public_message caps every message
