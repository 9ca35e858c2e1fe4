"""Backends: TorchScript on CPU (always) and CUDA, TensorRT (GPU + tensorrt only)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from node_agent.errors import InferenceFailed, InvalidInput, InvalidModel, ShuttingDown
from node_agent.examples import EXAMPLES, Example, build_module
from node_agent.runtime.backends import FORMATS, backend_for
from node_agent.runtime.backends.torchscript import TorchScriptBackend, optimized, short_message
from node_agent.runtime.model_yaml import write_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file
from node_agent.types import ModelConfig, TensorSpec

WORKING = [e for e in EXAMPLES if e.version != "2-failing"]
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def _example(name: str, version: str) -> Example:
    return next(e for e in EXAMPLES if (e.name, e.version) == (name, version))


def _inputs(config: ModelConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn((batch, *s.shape), generator=gen) for s in config.inputs}


@pytest.fixture(scope="module")
def repo(example_repo: Path) -> ModelRepository:
    return ModelRepository(example_repo)


@pytest.fixture(scope="module")
def loaded(repo: ModelRepository) -> Iterator[dict[str, TorchScriptBackend]]:
    """Every example loaded once on CPU, keyed 'name:version'."""
    backends = {}
    for config in repo.index():
        backend = repo.load(config, "cpu")
        assert isinstance(backend, TorchScriptBackend)
        backends[str(config.id)] = backend
    yield backends
    for backend in backends.values():
        backend.unload()


def test_backend_for_formats() -> None:
    assert backend_for("torchscript") is TorchScriptBackend
    assert set(FORMATS) == {"torchscript", "tensorrt", "tinylm-npz", "huggingface"}
    with pytest.raises(ValueError, match="no backend for format 'onnx'"):
        backend_for("onnx")


@pytest.mark.parametrize("example", WORKING, ids=lambda e: f"{e.name}:{e.version}")
def test_each_example_runs_on_cpu_and_matches_its_eager_module(
    loaded: dict[str, TorchScriptBackend], example: Example
) -> None:
    backend = loaded[f"{example.name}:{example.version}"]
    config = backend.config
    eager = build_module(example)
    # (the load's warm-up already ran a batch of max_batch_size)
    for batch in (1, 3):
        inputs = _inputs(config, batch)
        out = backend.run(inputs)
        assert list(out) == [s.name for s in config.outputs]
        for spec in config.outputs:
            assert out[spec.name].shape == (batch, *spec.shape)
            assert out[spec.name].dtype == torch.float32
        with torch.inference_mode():
            expected = eager(*inputs.values())
        torch.testing.assert_close(out[config.outputs[0].name], expected)


def test_versions_with_other_seeds_compute_other_results(
    loaded: dict[str, TorchScriptBackend],
) -> None:
    image = _inputs(loaded["classifier:1"].config, 4)
    one = loaded["classifier:1"].run(image)["logits"]
    two = loaded["classifier:2"].run(image)["logits"]
    assert not torch.allclose(one, two)
    assert torch.equal(loaded["classifier:1"].run(image)["logits"], one)  # deterministic


def test_failing_example_loads_then_fails_every_batch(
    loaded: dict[str, TorchScriptBackend],
) -> None:
    backend = loaded["classifier:2-failing"]
    assert backend.warmup_error is not None and "by design" in backend.warmup_error
    for batch, seed in ((1, 0), (5, 1)):
        with pytest.raises(InferenceFailed) as info:
            backend.run(_inputs(backend.config, batch, seed))
        assert str(info.value) == (
            "classifier:2-failing: the model raised RuntimeError: "
            "classifier/2-failing fails on every batch, by design"
        )
        assert isinstance(info.value.__cause__, torch.jit.Error)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.name}:{e.version}")
def test_measured_memory_covers_the_parameters(
    loaded: dict[str, TorchScriptBackend], example: Example
) -> None:
    backend = loaded[f"{example.name}:{example.version}"]
    eager = build_module(example)
    param_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    assert param_bytes > 0
    assert backend.param_bytes == param_bytes
    assert backend.memory_bytes >= param_bytes
    assert backend.memory_bytes == backend.param_bytes + backend.warmup_bytes


def _ops(backend: TorchScriptBackend) -> set[str]:
    """The operators in the graph of the module the backend runs."""
    return set(re.findall(r"(?:aten|prim)::\w+", str(backend._module.graph)))  # type: ignore[union-attr]


def test_models_are_frozen_and_optimized_for_the_cpu_at_load(
    repo: ModelRepository, loaded: dict[str, TorchScriptBackend], tmp_path: Path
) -> None:
    backend = loaded["classifier:1"]
    assert not list(backend._module.parameters())  # type: ignore[union-attr]  # frozen: constants
    assert {"prim::mkldnn_convolution", "prim::ConstantMKLDNNTensor"} <= _ops(backend)
    assert "prim::CallMethod" not in _ops(backend)  # submodules inlined

    # parameters.optimize: false serves the module as loaded, with the same results
    config = dataclasses.replace(backend.config, parameters={"optimize": "False"})
    plain = TorchScriptBackend.load(config, repo.version_dir(config.id), "cpu")
    assert "prim::CallMethod" in _ops(plain) and not any("mkldnn" in op for op in _ops(plain))
    assert plain.param_bytes == backend.param_bytes
    image = _inputs(config, 5)
    torch.testing.assert_close(plain.run(image)["logits"], backend.run(image)["logits"])

    bad = dataclasses.replace(config, parameters={"optimize": "sometimes"})
    with pytest.raises(InvalidModel, match=r"parameters.optimize must be true or false, got 'sometimes'"):
        TorchScriptBackend.load(bad, repo.version_dir(config.id), "cpu")


def test_a_module_that_cannot_be_frozen_is_served_as_loaded(caplog: pytest.LogCaptureFixture) -> None:
    module = torch.jit.script(_Pair()).train()  # freezing needs eval mode: it raises
    with caplog.at_level("WARNING", logger="node_agent.runtime.backends.torchscript"):
        assert optimized(module, torch.device("cpu"), "pair:1") is module
    assert "pair:1: served as loaded: freezing/optimizing it failed" in caplog.text


def test_wrong_input_names_are_invalid_input(loaded: dict[str, TorchScriptBackend]) -> None:
    backend = loaded["mlp:1"]
    with pytest.raises(InvalidInput, match=r"missing \['features'\], unexpected \['x'\]"):
        backend.run({"x": torch.zeros(1, 32)})
    with pytest.raises(InvalidInput, match=r"unexpected \['extra'\]"):
        backend.run({"features": torch.zeros(1, 32), "extra": torch.zeros(1)})


def test_model_errors_on_bad_shapes_are_inference_failed(
    loaded: dict[str, TorchScriptBackend],
) -> None:
    with pytest.raises(InferenceFailed, match="mlp:1: the model raised RuntimeError"):
        loaded["mlp:1"].run({"features": torch.zeros(2, 31)})


def test_concurrent_runs_from_threads_agree(loaded: dict[str, TorchScriptBackend]) -> None:
    backend = loaded["mlp:1"]
    inputs = [_inputs(backend.config, 8, seed) for seed in range(8)]
    expected = [backend.run(x)["scores"] for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def worker(i: int) -> None:
        for _ in range(10):
            results[i] = backend.run(inputs[i])["scores"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        torch.testing.assert_close(results[i], expected[i])


def test_unload_is_idempotent_and_final(repo: ModelRepository) -> None:
    backend = repo.load(repo.config("mlp", "1"), "cpu")
    backend.run({"features": torch.zeros(1, 32)})
    backend.unload()
    backend.unload()
    with pytest.raises(ShuttingDown, match="unloaded"):
        backend.run({"features": torch.zeros(1, 32)})


def _custom_model(
    tmp_path: Path,
    module: torch.nn.Module,
    outputs: tuple[TensorSpec, ...],
) -> tuple[ModelRepository, ModelConfig]:
    """Save a scripted `module` as custom/1 taking `x` FP32 [4]."""
    vdir = tmp_path / "custom" / "1"
    vdir.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(vdir / "model.pt"))
    config = ModelConfig(
        name="custom",
        version="1",
        format="torchscript",
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=outputs,
        artifact="model.pt",
        digest=sha256_file(vdir / "model.pt"),
        max_batch_size=2,
    )
    write_model_config(vdir, config)
    return ModelRepository(tmp_path), config


class _TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": x.sum(dim=1, keepdim=True), "doubled": x * 2}


class _Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(dim=1, keepdim=True)


TWO = (TensorSpec("doubled", "FP32", (4,)), TensorSpec("total", "FP32", (1,)))


@pytest.mark.parametrize("module", [_TwoOutputs(), _Pair()], ids=["dict", "tuple"])
def test_outputs_are_named_from_dicts_and_tuples(tmp_path: Path, module: torch.nn.Module) -> None:
    repo, config = _custom_model(tmp_path, module, TWO)
    backend = repo.load(config, "cpu")
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    out = backend.run({"x": x})
    torch.testing.assert_close(out["doubled"], x * 2)
    torch.testing.assert_close(out["total"], torch.tensor([[6.0], [22.0]]))


def test_outputs_not_matching_model_yaml_fail(tmp_path: Path) -> None:
    repo, config = _custom_model(tmp_path, _Pair(), (TensorSpec("y", "FP32", (4,)),))
    backend = repo.load(config, "cpu")
    assert isinstance(backend, TorchScriptBackend)
    assert backend.warmup_error is not None
    with pytest.raises(InferenceFailed, match=r"returned 2 value\(s\), model.yaml declares 1"):
        backend.run({"x": torch.zeros(1, 4)})


def test_a_corrupt_archive_is_an_invalid_model(repo: ModelRepository, tmp_path: Path) -> None:
    src = repo.version_dir(repo.config("mlp", "1").id)
    dst = tmp_path / "mlp" / "1"
    shutil.copytree(src, dst)
    (dst / "model.pt").write_bytes(b"this is not a zip archive")
    copy = ModelRepository(tmp_path)
    config = copy.config("mlp", "1")
    config = dataclasses.replace(config, digest=sha256_file(dst / "model.pt"))
    with pytest.raises(InvalidModel, match=r"mlp:1: .*model.pt is not a TorchScript archive"):
        copy.load(config, "cpu")


def test_cpu_backend_refuses_other_devices(repo: ModelRepository) -> None:
    with pytest.raises(ValueError, match="cpu or cuda"):
        repo.load(repo.config("mlp", "1"), "mps")


def test_short_message_reads_torchscript_errors() -> None:
    err = torch.jit.Error(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript (most recent call last):\n  File x\n"
        "builtins.ValueError: bad thing\n"
    )
    assert short_message(err) == "ValueError: bad thing"
    assert short_message(KeyError("k")) == "KeyError: 'k'"
    assert short_message(RuntimeError("")) == "RuntimeError"


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_torchscript_on_cuda_matches_cpu_on_a_stream(
    repo: ModelRepository, loaded: dict[str, TorchScriptBackend]
) -> None:
    config = repo.config("classifier", "2")
    backend = repo.load(config, "cuda:0")
    try:
        assert isinstance(backend, TorchScriptBackend)
        assert backend.memory_bytes >= backend.param_bytes > 0
        inputs = _inputs(config, 4)
        stream = torch.cuda.Stream()
        out = backend.run(inputs, stream=stream)
        assert out["logits"].device.type == "cuda"
        torch.testing.assert_close(
            out["logits"].cpu(), loaded["classifier:2"].run(inputs)["logits"], rtol=1e-3, atol=1e-3
        )
    finally:
        backend.unload()
    failing = repo.load(repo.config("classifier", "2-failing"), "cuda:0")
    try:
        with pytest.raises(InferenceFailed, match="by design"):
            failing.run(_inputs(config, 2), stream=torch.cuda.Stream())
    finally:
        failing.unload()


def _mlp_engine(trt: object, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Build y = relu(x @ w + b), x [-1, 32] -> y [-1, 4], with TensorRT's network API."""
    import numpy as np

    gen = torch.Generator().manual_seed(7)
    w, b = torch.randn(32, 4, generator=gen), torch.randn(1, 4, generator=gen)
    logger = trt.Logger(trt.Logger.WARNING)  # type: ignore[attr-defined]
    builder = trt.Builder(logger)  # type: ignore[attr-defined]
    network = builder.create_network(0)
    x = network.add_input("features", trt.float32, (-1, 32))  # type: ignore[attr-defined]
    w_np, b_np = np.ascontiguousarray(w.numpy()), np.ascontiguousarray(b.numpy())
    wc = network.add_constant((32, 4), trt.Weights(w_np))  # type: ignore[attr-defined]
    bc = network.add_constant((1, 4), trt.Weights(b_np))  # type: ignore[attr-defined]
    none = trt.MatrixOperation.NONE  # type: ignore[attr-defined]
    mm = network.add_matrix_multiply(x, none, wc.get_output(0), none)
    add = network.add_elementwise(mm.get_output(0), bc.get_output(0), trt.ElementWiseOperation.SUM)  # type: ignore[attr-defined]
    relu = network.add_activation(add.get_output(0), trt.ActivationType.RELU)  # type: ignore[attr-defined]
    out = relu.get_output(0)
    out.name = "scores"
    network.mark_output(out)
    profile = builder.create_optimization_profile()
    profile.set_shape("features", (1, 32), (8, 32), (16, 32))
    cfg = builder.create_builder_config()
    cfg.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, cfg)
    assert plan is not None
    path.write_bytes(bytes(plan))
    return w, b


@pytest.mark.gpu
def test_tensorrt_engine_loads_and_runs(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="needs the tensorrt package (pip install 'edgefleet[gpu]')")
    vdir = tmp_path / "trt-mlp" / "1"
    vdir.mkdir(parents=True)
    w, b = _mlp_engine(trt, vdir / "model.plan")
    config = ModelConfig(
        name="trt-mlp",
        version="1",
        format="tensorrt",
        inputs=(TensorSpec("features", "FP32", (32,)),),
        outputs=(TensorSpec("scores", "FP32", (4,)),),
        artifact="model.plan",
        digest=sha256_file(vdir / "model.plan"),
        max_batch_size=16,
    )
    write_model_config(vdir, config)
    repo = ModelRepository(tmp_path)
    backend = repo.load(repo.config("trt-mlp"), "cuda:0")
    try:
        assert type(backend).__name__ == "TensorRTBackend"
        assert backend.memory_bytes > 0
        stream = torch.cuda.Stream()
        for batch in (1, 5, 16):
            x = torch.randn(batch, 32)
            out = backend.run({"features": x}, stream=stream)["scores"]
            assert out.shape == (batch, 4)
            torch.testing.assert_close(out.cpu(), torch.relu(x @ w + b), rtol=1e-2, atol=1e-2)
        with pytest.raises(InvalidInput, match="outside the engine's profile"):
            backend.run({"features": torch.zeros(17, 32)})
        with pytest.raises(InvalidInput):
            backend.run({"x": torch.zeros(1, 32)})
    finally:
        backend.unload()
        backend.unload()
    bad = dataclasses.replace(config, max_batch_size=32)
    write_model_config(vdir, bad)
    with pytest.raises(InvalidModel, match="admits batches up to 16"):
        repo.load(repo.config("trt-mlp"), "cuda:0")
