"""The KServe v2 gRPC API end to end: real agents on 127.0.0.1 serving the example models,
`tritonclient.grpc` with its defaults (and its raw stub where a test needs the message itself or
the trailing metadata). The cases mirror the HTTP API's (test_http_api.py) where they apply; the
outputs must be bitwise those of the HTTP path for the same input.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from agent_runner import RunningAgent
from prometheus_client.parser import text_string_to_metric_families
from test_http_api import long_window
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from node_agent.agent import AgentSettings
from node_agent.errors import AgentError
from node_agent.runtime.engine import EngineSettings
from node_agent.serving.error_status import ERROR_STATUS
from node_agent.serving.grpc_server import GRPC_CODES, GrpcSettings, peer_address
from node_agent.serving.http import HttpSettings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
Code = grpc.StatusCode


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def agent_settings(repo: Path, http: HttpSettings | None = None, **kw: Any) -> AgentSettings:
    http = http or HttpSettings(host="127.0.0.1", port=0)
    return AgentSettings(repo, workers=1, http=http, grpc=GrpcSettings(host="127.0.0.1", port=0), **kw)


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grpc") / "models"
    shutil.copytree(example_repo, root)
    return root


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(agent_settings(repo))
    yield running
    running.close()


@pytest.fixture(scope="module")
def locked(repo: Path) -> Iterator[RunningAgent]:
    """Auth on; repository control only from 127.0.0.2; requests of at most 64 KiB."""
    http = HttpSettings(host="127.0.0.1", port=0, auth_token=TOKEN, repository_control_from=("127.0.0.2/32",),
                        max_request_bytes=64 * 1024)  # fmt: skip
    running = RunningAgent(agent_settings(repo, http))
    yield running
    running.close()


def grpc_url(running: RunningAgent) -> str:
    assert running.agent.grpc_port
    return f"127.0.0.1:{running.agent.grpc_port}"


@pytest.fixture()
def client(served: RunningAgent) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(grpc_url(served))
    yield c
    c.close()


@pytest.fixture()
def stub(served: RunningAgent) -> Iterator[tpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(grpc_url(served)) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def raw_request(x: np.ndarray, model: str = "classifier", version: str = "1", **params: Any) -> Any:
    request = tpb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    for key, value in params.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request


# --- probes and metadata ----------------------------------------------------------------


def test_probes_and_metadata_through_tritonclient(client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edgefleet-agent" and "model_repository" in meta["extensions"]
    model = client.get_model_metadata("classifier", as_json=True)
    assert model == {
        "name": "classifier",
        "versions": ["1", "2-failing", "2-slow", "2"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": ["-1", "3", "64", "64"]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}],
    }
    assert list(client.get_model_metadata("mlp", "1").inputs[0].shape) == [-1, 32]
    assert client.is_model_ready("classifier", "2-slow")
    assert not client.is_model_ready("classifier", "9") and not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as info:
        client.get_model_metadata("nope")
    assert info.value.status() == str(Code.NOT_FOUND)


# --- inference --------------------------------------------------------------------------


def test_raw_inference_is_bitwise_the_http_answer(
    served: RunningAgent, client: tgrpc.InferenceServerClient
) -> None:
    x = images(3, seed=1)
    g_in = tgrpc.InferInput("image", list(x.shape), "FP32")
    g_in.set_data_from_numpy(x)
    h_in = thttp.InferInput("image", list(x.shape), "FP32")
    h_in.set_data_from_numpy(x)
    http = thttp.InferenceServerClient(served.url)
    try:
        for version in ("1", ""):  # "": the newest, "2"
            got = client.infer("classifier", [g_in], model_version=version, request_id="req-1")
            want = http.infer("classifier", [h_in], model_version=version)
            assert got.as_numpy("logits").tobytes() == want.as_numpy("logits").tobytes()
            response = got.get_response()
            assert response.id == "req-1" and response.model_version == (version or "2")
            assert (
                len(response.raw_output_contents) == 1 and len(response.raw_output_contents[0]) == 3 * 10 * 4
            )
    finally:
        http.close()


def test_typed_contents_match_raw_contents(stub: tpb_grpc.GRPCInferenceServiceStub) -> None:
    x = images(2, seed=2)
    raw = stub.ModelInfer(raw_request(x))
    typed = tpb.ModelInferRequest(model_name="classifier", model_version="1")
    tensor = typed.inputs.add(name="image", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    answer = stub.ModelInfer(typed)
    assert answer.raw_output_contents == raw.raw_output_contents
    assert [o.name for o in answer.outputs] == ["logits"] and list(answer.outputs[0].shape) == [2, 10]


def test_requested_outputs_are_honoured(client: tgrpc.InferenceServerClient) -> None:
    x = images(1, seed=4)
    inp = tgrpc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("classifier", [inp], outputs=[tgrpc.InferRequestedOutput("logits")])
    assert result.as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException, match="unknown output 'probs'") as info:
        client.infer("classifier", [inp], outputs=[tgrpc.InferRequestedOutput("probs")])
    assert info.value.status() == str(Code.INVALID_ARGUMENT)


# --- malformed requests: code and message -----------------------------------------------

GOOD = images(1, seed=3)


def changed(**changes: Any) -> Any:
    request = raw_request(GOOD)
    tensor = request.inputs[0]
    for key, value in changes.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        elif key == "raw":
            del request.raw_input_contents[:]
            request.raw_input_contents.extend(value)
        else:
            setattr(tensor, key, value)
    return request


def with_contents() -> Any:
    request = raw_request(GOOD)
    request.inputs[0].contents.fp32_contents.append(1.0)
    return request


def fp16_typed() -> Any:
    request = tpb.ModelInferRequest(model_name="classifier", model_version="1")
    request.inputs.add(name="image", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    return request


def no_inputs() -> Any:
    return tpb.ModelInferRequest(model_name="classifier", model_version="1")


def wanting(output: str) -> Any:
    request = raw_request(GOOD)
    request.outputs.add(name=output)
    return request


BAD: list[tuple[str, Any, Code, str]] = [
    ("wrong input name", changed(name="img"), Code.INVALID_ARGUMENT,
     "unexpected input(s) 'img'; the model takes 'image'"),
    ("wrong datatype", changed(datatype="FP64", raw=[GOOD.astype(np.float64).tobytes()]),
     Code.INVALID_ARGUMENT, "input 'image' has datatype FP64, but the model takes FP32"),
    ("unknown datatype", changed(datatype="FLOAT"), Code.INVALID_ARGUMENT, "unknown datatype 'FLOAT'"),
    ("wrong shape", changed(shape=[4, 3, 32, 32]), Code.INVALID_ARGUMENT,
     "has shape [4, 3, 32, 32], expected [-1, 3, 64, 64]"),
    ("byte count", changed(raw=[GOOD.tobytes()[:4000]]), Code.INVALID_ARGUMENT, "needs 49152 bytes"),
    ("raw count", changed(raw=[GOOD.tobytes(), b""]), Code.INVALID_ARGUMENT,
     "raw_input_contents has 2 entries for 1 inputs"),
    ("raw and contents", with_contents(), Code.INVALID_ARGUMENT, "has 'contents' although"),
    ("FP16 typed", fp16_typed(), Code.INVALID_ARGUMENT, "FP16 has no typed contents"),
    ("no inputs", no_inputs(), Code.INVALID_ARGUMENT, "'inputs' must be a non-empty list"),
    ("unknown output", wanting("probs"), Code.INVALID_ARGUMENT, "unknown output 'probs'"),
    ("bad priority", raw_request(GOOD, priority="urgent"), Code.INVALID_ARGUMENT, "unknown class 'urgent'"),
    ("negative timeout", raw_request(GOOD, timeout=-5), Code.INVALID_ARGUMENT, "'timeout' must be >= 0"),
    ("expired timeout", raw_request(GOOD, timeout=1), Code.DEADLINE_EXCEEDED, "deadline"),
    ("unknown model", raw_request(GOOD, model="nope", version=""), Code.NOT_FOUND, "no model named 'nope'"),
    ("unknown version", raw_request(GOOD, version="9"), Code.NOT_FOUND, "no model classifier:9"),
    ("failing model", raw_request(GOOD, version="2-failing"), Code.INTERNAL,
     "fails on every batch, by design"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "code", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_requests_get_their_code_and_message(
    stub: tpb_grpc.GRPCInferenceServiceStub, message: Any, code: Code, text: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(message, timeout=60)
    error: Any = info.value
    assert error.code() == code and text in error.details(), error.details()
    assert "Traceback" not in error.details() and "\n" not in error.details()


def test_unimplemented_methods_say_so(stub: tpb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SystemSharedMemoryStatus(tpb.SystemSharedMemoryStatusRequest())
    assert info.value.code() == Code.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_every_error_status_has_a_grpc_code() -> None:
    assert set(ERROR_STATUS.values()) <= set(GRPC_CODES)
    assert (
        GRPC_CODES[429] == GRPC_CODES[413] == Code.RESOURCE_EXHAUSTED and GRPC_CODES[503] == Code.UNAVAILABLE
    )
    assert all(issubclass(cls, AgentError) for cls in ERROR_STATUS)


def test_peer_address() -> None:
    assert peer_address("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5000") == "::1"
    assert peer_address("unix:/run/agent.sock") is None and peer_address("") is None


# --- limits and auth --------------------------------------------------------------------


def test_token_guards_everything_but_the_probes(locked: RunningAgent) -> None:
    client = tgrpc.InferenceServerClient(grpc_url(locked))
    try:
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException, match="bearer token") as info:
            client.get_model_metadata("classifier")
        assert info.value.status() == str(Code.UNAUTHENTICATED)
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("classifier", headers={"authorization": "Bearer wrong"})
        assert info.value.status() == str(Code.UNAUTHENTICATED)
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert client.get_model_metadata("classifier", headers=auth).name == "classifier"
        assert client.is_model_ready("classifier", headers=auth)
    finally:
        client.close()


def test_messages_over_the_request_limit_are_refused(locked: RunningAgent) -> None:
    client = tgrpc.InferenceServerClient(grpc_url(locked))
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        x = images(1, seed=5)  # 48 KiB: inside the 64 KiB limit
        inp = tgrpc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("classifier", [inp], headers=auth).as_numpy("logits").shape == (1, 10)
        big = images(2, seed=5)
        inp = tgrpc.InferInput("image", list(big.shape), "FP32")
        inp.set_data_from_numpy(big)
        with pytest.raises(InferenceServerException) as info:
            client.infer("classifier", [inp], headers=auth)
        assert info.value.status() == str(Code.RESOURCE_EXHAUSTED)
    finally:
        client.close()


def test_repository_control_only_from_allowed_peers(locked: RunningAgent) -> None:
    client = tgrpc.InferenceServerClient(grpc_url(locked))
    try:
        with pytest.raises(InferenceServerException, match=r"not allowed from 127\.0\.0\.1") as info:
            client.unload_model("mlp", headers={"authorization": f"Bearer {TOKEN}"})
        assert info.value.status() == str(Code.PERMISSION_DENIED)
    finally:
        client.close()


# --- model repository -------------------------------------------------------------------


def test_index_unload_and_load(
    client: tgrpc.InferenceServerClient, stub: tpb_grpc.GRPCInferenceServiceStub
) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "mlp", "version": "1", "state": "READY"} in index
    client.unload_model("mlp")
    try:
        assert not client.is_model_ready("mlp")
        states = {
            (m["name"], m.get("state")) for m in client.get_model_repository_index(as_json=True)["models"]
        }
        assert ("mlp", "UNAVAILABLE") in states
        assert all(
            m.name != "mlp" for m in stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True)).models
        )
        request = tpb.ModelInferRequest(model_name="mlp")
        request.inputs.add(name="features", datatype="FP32", shape=[1, 32])
        request.raw_input_contents.append(np.zeros((1, 32), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        error: Any = info.value
        assert error.code() == Code.UNAVAILABLE and "is unloaded" in error.details()
        assert ("retry-after", "5") in tuple(error.trailing_metadata())
    finally:
        client.load_model("mlp")
    assert client.is_model_ready("mlp")
    with pytest.raises(InferenceServerException, match="invalid model name") as info:
        client.load_model("../mlp")
    assert info.value.status() == str(Code.INVALID_ARGUMENT)
    with pytest.raises(InferenceServerException, match="load parameters are not supported") as info:
        client.load_model("mlp", config='{"max_batch_size": 4}')
    assert info.value.status() == str(Code.INVALID_ARGUMENT)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("nope")
    assert info.value.status() == str(Code.NOT_FOUND)


# --- admission --------------------------------------------------------------------------


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(repo: Path) -> None:
    """A queue bound of 16 rows and 12 concurrent requests of 16 rows for the slow classifier:
    every request gets exactly one answer, OK or RESOURCE_EXHAUSTED with `retry-after` in its
    trailing metadata, and some are refused."""
    running = RunningAgent(agent_settings(repo, engine=EngineSettings(max_queue_rows=16)))
    try:
        x = images(16, seed=6)
        with grpc.insecure_channel(grpc_url(running)) as channel:
            infer = tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            def call(_: int) -> tuple[Code, tuple[Any, ...]]:
                try:
                    infer(raw_request(x, version="2-slow"), timeout=120)
                    return Code.OK, ()
                except grpc.RpcError as e:
                    error: Any = e
                    return error.code(), tuple(error.trailing_metadata() or ())

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(call, range(12)))
        codes = [code for code, _ in answers]
        assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}, answers
        assert Code.OK in codes and Code.RESOURCE_EXHAUSTED in codes, codes
        for code, trailers in answers:
            if code == Code.RESOURCE_EXHAUSTED:
                keys = dict(trailers)
                assert int(keys["retry-after"]) >= 1 and int(keys["grpc-retry-pushback-ms"]) >= 1000
    finally:
        running.close()


# --- `edgefleet-agent serve --grpc-port`: SIGTERM drains RPCs in progress ---------------------


def test_sigterm_lets_rpcs_in_progress_finish(repo: Path, tmp_path: Path) -> None:
    """`serve --grpc-port 0`: RPCs waiting in a 6 s batch window when SIGTERM arrives all finish
    OK (the gRPC server drains within the HTTP drain budget), and the process exits 0."""
    root = tmp_path / "models"
    shutil.copytree(repo, root)
    long_window(root)  # mlp/1-window
    cmd = [sys.executable, "-m", "node_agent.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--grpc-port", "0", "--model-repository", str(root), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    output: list[str] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and " and grpc://" not in line:
            output.append(line)
            line = proc.stdout.readline()
        assert " and grpc://127.0.0.1:" in line, "".join(output)
        port = int(line.rsplit(":", 1)[1])
        stdout = proc.stdout
        threading.Thread(target=lambda: output.extend(iter(stdout.readline, "")), daemon=True).start()
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        give_up = time.monotonic() + 60
        while not client.is_server_ready():
            assert time.monotonic() < give_up
            time.sleep(0.05)
        inp = tgrpc.InferInput("features", [1, 32], "FP32")
        inp.set_data_from_numpy(np.full((1, 32), 0.5, np.float32))
        with ThreadPoolExecutor(6) as pool:
            pending = [
                pool.submit(client.infer, "mlp", [inp], model_version="1-window", client_timeout=60)
                for _ in range(6)
            ]
            time.sleep(0.5)  # let them reach the agent (and its batch window)
            proc.send_signal(signal.SIGTERM)
            in_progress = sum(not f.done() for f in pending)
            results = [f.result(60) for f in pending]
        assert all(r.as_numpy("scores").shape[0] == 1 for r in results)
        assert in_progress > 0, "no RPC was in progress at SIGTERM; the test proves less"
        assert proc.wait(30) == 0, "".join(output)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_every_call_is_counted_by_rpc_and_status_code(
    served: RunningAgent, stub: tpb_grpc.GRPCInferenceServiceStub
) -> None:
    """edgefleet_grpc_requests_total{rpc, code} and the duration histogram, on /metrics."""

    def count(rpc: str, code: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "edgefleet_grpc_requests_total" and s.labels == {"rpc": rpc, "code": code}:
                    return s.value
        return 0.0

    ok, missing = count("ModelInfer", "OK"), count("ModelInfer", "NOT_FOUND")
    stub.ModelInfer(raw_request(images(1, 0)))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(raw_request(images(1, 0), model="no-such-model"))
    assert count("ModelInfer", "OK") == ok + 1
    assert count("ModelInfer", "NOT_FOUND") == missing + 1
