"""The engine end to end: repository -> scheduler -> batcher -> stream pool, real models."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import Priority
from node_agent.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
)
from node_agent.runtime.engine import Engine, EngineSettings
from node_agent.runtime.model_yaml import write_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool
from node_agent.types import ModelConfig, TensorSpec

T = TypeVar("T")


def run(main: Callable[[Stack], Awaitable[T]], root: Path, timeout_s: float = 30.0,
        **engine_kw: Any) -> T:  # fmt: skip
    """Build repository, scheduler, pool and engine; run `main`; tear everything down."""

    async def body() -> T:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        stack = Stack(root, **engine_kw)
        try:
            return await asyncio.wait_for(main(stack), timeout_s)
        finally:
            await stack.engine.stop()
            await stack.scheduler.close()
            stack.pool.stop()
            assert not errors, errors

    return asyncio.run(body())


class Stack:
    def __init__(self, root: Path, workers: int = 1, **settings: Any) -> None:
        self.repo = ModelRepository(root)
        self.scheduler = ModelScheduler(2 << 30, lambda cfg: self.repo.load(cfg, "cpu"))
        self.pool = StreamPool(PoolSettings(num_workers=workers, torch_threads=1)).start()
        self.engine = Engine(self.repo, self.scheduler, self.pool, EngineSettings(**settings))

    def module(self, name: str, version: str) -> torch.jit.ScriptModule:
        config = self.repo.config(name, version)
        return torch.jit.load(str(self.repo.artifact_path(config)))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def reference(module: torch.jit.ScriptModule, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


# --- end to end on the example models ------------------------------------------


def test_classifier_requests_get_their_own_logits(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        xs = [images(1 + i % 3, seed=i) for i in range(24)]
        results = await asyncio.gather(*[s.engine.infer("classifier", "1", {"image": x}) for x in xs])
        module = s.module("classifier", "1")
        for x, out in zip(xs, results, strict=True):
            assert set(out) == {"logits"} and out["logits"].shape == (len(x), 10)
            assert isinstance(out["logits"], np.ndarray)
            np.testing.assert_allclose(out["logits"], reference(module, x), rtol=1e-4, atol=1e-5)
        # several requests shared batches; every lease was released when its batch was done
        batcher = s.engine.batcher("classifier", "1")
        assert batcher.batches < len(xs)
        assert [m.in_flight for m in s.scheduler.resident()] == [0]
        stats = s.scheduler.stats
        assert stats.loads == 1 and 1 <= stats.hits + stats.misses <= batcher.batches + 2
        s.scheduler.check_invariants()

    run(main, example_repo)


def test_newest_version_torch_inputs_and_string_priority(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        assert s.engine.config("classifier").version == "2"  # 1 < 2-failing < 2-slow < 2
        x = images(2, seed=7)
        out = await s.engine.infer("classifier", None, {"image": torch.from_numpy(x)},
                                   priority="high")  # fmt: skip
        np.testing.assert_allclose(
            out["logits"], reference(s.module("classifier", "2"), x), rtol=1e-4, atol=1e-5
        )
        feats = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
        scores = await s.engine.infer("mlp", "1", {"features": feats}, priority=Priority.LOW)
        np.testing.assert_allclose(
            scores["scores"], reference(s.module("mlp", "1"), feats), rtol=1e-4, atol=1e-5
        )

    run(main, example_repo)


def test_request_bigger_than_max_batch_size_is_split(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        x = images(37, seed=11)  # classifier max_batch_size is 16: 3 chunks
        out = await s.engine.infer("classifier", "1", {"image": x})
        np.testing.assert_allclose(
            out["logits"], reference(s.module("classifier", "1"), x), rtol=1e-4, atol=1e-5
        )

    run(main, example_repo)


def test_hundreds_of_concurrent_requests_unique_payloads(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        rng = np.random.default_rng(5)
        xs = [rng.standard_normal((int(rng.integers(1, 5)), 32)).astype(np.float32)
              for _ in range(400)]  # fmt: skip
        # one request first: admission measures the model's drain rate from its batches
        # (before any, a queue that holds rows admits only a few hundred more)
        await s.engine.infer("mlp", "1", {"features": xs[0]})
        results = await asyncio.gather(*[s.engine.infer("mlp", "1", {"features": x}) for x in xs])
        module = s.module("mlp", "1")
        for x, out in zip(xs, results, strict=True):
            np.testing.assert_allclose(out["scores"], reference(module, x), rtol=1e-4, atol=1e-5)
        b = s.engine.batcher("mlp", "1")
        assert b.completed == 401 and b.rows_run == sum(len(x) for x in xs) + len(xs[0])

    run(main, example_repo, workers=2)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input(s) 'image'"),
        ({"image": images(1, 0), "mask": images(1, 0)}, "unexpected input(s) 'mask'"),
        ({"img": images(1, 0)}, "missing input(s) 'image'; unexpected input(s) 'img'"),
        ({"image": images(1, 0).astype(np.float64)}, "'image' has dtype float64, expected FP32"),
        ({"image": images(1, 0)[0]}, "shape [3, 64, 64], expected [-1, 3, 64, 64]"),
        ({"image": np.zeros((2, 3, 32, 64), np.float32)}, "shape [2, 3, 32, 64]"),
        ({"image": np.zeros((0, 3, 64, 64), np.float32)}, "empty dimension"),
        ({"image": [[1.0]]}, "'image' is a list"),
    ],
)
def test_malformed_inputs_raise_invalid_input_naming_the_problem(
    example_repo: Path, inputs: dict[str, Any], message: str
) -> None:
    async def main(s: Stack) -> None:
        with pytest.raises(InvalidInput) as e:
            await s.engine.infer("classifier", "1", inputs)
        assert message in str(e.value)
        assert "classifier:1" in str(e.value)

    run(main, example_repo)


def test_a_malformed_request_fails_alone(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        good = [images(1, seed=i) for i in range(6)]
        calls = [s.engine.infer("classifier", "1", {"image": x}) for x in good]
        calls.insert(3, s.engine.infer("classifier", "1", {"image": images(1, 9)[:, :2]}))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes.pop(3), InvalidInput)
        module = s.module("classifier", "1")
        for x, out in zip(good, outcomes, strict=True):
            assert isinstance(out, dict)
            np.testing.assert_allclose(out["logits"], reference(module, x), rtol=1e-4, atol=1e-5)

    run(main, example_repo)


def test_unknown_model_or_version(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        with pytest.raises(ModelNotFound):
            await s.engine.infer("nope", None, {"image": images(1, 0)})
        with pytest.raises(ModelNotFound):
            await s.engine.infer("classifier", "9", {"image": images(1, 0)})

    run(main, example_repo)


def test_failing_model_fails_every_caller_and_nobody_hangs(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        calls = [s.engine.infer("classifier", "2-failing", {"image": images(1, i)}) for i in range(5)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, InferenceFailed) for o in outcomes), outcomes
        assert "fails on every batch" in str(outcomes[0])
        assert [m.in_flight for m in s.scheduler.resident()] == [0]

    run(main, example_repo)


def test_timeouts_and_admission(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        # warm the slow model so its speed is known, then ask for the impossible
        await s.engine.infer("classifier", "2-slow", {"image": images(16, 1)})
        with pytest.raises(DeadlineExceeded):
            await s.engine.infer("classifier", "2-slow", {"image": images(16, 2)}, timeout_s=1e-4)
        with pytest.raises(DeadlineExceeded):
            await s.engine.infer("classifier", "1", {"image": images(1, 2)}, timeout_s=0)
        # a queue bound of 32 rows: 48 rows at once cannot all be admitted
        calls = [s.engine.infer("classifier", "2-slow", {"image": images(16, i)}) for i in range(4)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        assert refused and all(o.retry_after_s > 0 for o in refused)
        assert any(isinstance(o, dict) for o in outcomes)

    run(main, example_repo, max_queue_rows=32)


def test_stop_fails_pending_callers_with_shutting_down(example_repo: Path) -> None:
    async def main(s: Stack) -> None:
        calls = [
            asyncio.ensure_future(s.engine.infer("classifier", "2-slow", {"image": images(4, i)}))
            for i in range(12)
        ]
        while s.engine.batcher("classifier", "2-slow").batches_out == 0:
            await asyncio.sleep(0.005)
        await s.engine.stop()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        done = [o for o in outcomes if isinstance(o, dict)]
        stopped = [o for o in outcomes if isinstance(o, ShuttingDown)]
        assert len(done) + len(stopped) == 12 and stopped
        with pytest.raises(ShuttingDown):
            await s.engine.infer("classifier", "1", {"image": images(1, 0)})
        assert [m.in_flight for m in s.scheduler.resident()] == [0]

    run(main, example_repo)


# --- several inputs, dynamic dims ---------------------------------------------------


class PairModel(nn.Module):
    """a [B,4], b [B,L] -> total [B,1] = sum(a) + sum(b), doubled [B,L] = 2b."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.sum(1, keepdim=True) + b.sum(1, keepdim=True), b * 2


@pytest.fixture(scope="module")
def pair_repo(tmp_path_factory: pytest.TempPathFactory, example_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("pair-repo")
    shutil.copytree(example_repo / "mlp", root / "mlp")
    vdir = root / "pair" / "1"
    vdir.mkdir(parents=True)
    torch.jit.save(torch.jit.script(PairModel()), str(vdir / "model.pt"))
    config = ModelConfig(
        name="pair", version="1", format="torchscript",
        inputs=(TensorSpec("a", "FP32", (4,)), TensorSpec("b", "FP32", (-1,))),
        outputs=(TensorSpec("total", "FP32", (1,)), TensorSpec("doubled", "FP32", (-1,))),
        artifact="model.pt", digest=sha256_file(vdir / "model.pt"), max_batch_size=8,
    )  # fmt: skip
    write_model_config(vdir, config)
    return root


def test_several_inputs_with_dynamic_dims(pair_repo: Path) -> None:
    async def main(s: Stack) -> None:
        rng = np.random.default_rng(2)
        reqs = []
        for i in range(20):
            rows, length = 1 + i % 3, 2 + i % 4
            reqs.append({
                "a": rng.standard_normal((rows, 4)).astype(np.float32),
                "b": rng.standard_normal((rows, length)).astype(np.float32),
            })  # fmt: skip
        results = await asyncio.gather(*[s.engine.infer("pair", "1", r) for r in reqs])
        for r, out in zip(reqs, results, strict=True):
            np.testing.assert_allclose(
                out["total"][:, 0], r["a"].sum(1) + r["b"].sum(1), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_array_equal(out["doubled"], 2 * r["b"])
        with pytest.raises(InvalidInput, match="'b' has 2 rows, but 'a' has 1"):
            await s.engine.infer("pair", "1", {"a": reqs[0]["a"][:1], "b": np.ones((2, 3), "f4")})

    run(main, pair_repo)


def test_adaptive_policy_from_the_model_sla(example_repo: Path) -> None:
    """A model with a p99 target gets an adaptive batcher whose plan fits the target."""

    async def main(s: Stack) -> None:
        config = dataclasses.replace(s.repo.config("classifier", "1"), sla=SlaObjectives(p99_latency_s=0.2))
        s.repo.config = lambda name, version=None: config  # type: ignore[method-assign]

        async def client(k: int) -> int:
            done = 0
            for i in range(8):
                try:
                    await s.engine.infer("classifier", "1", {"image": images(1, 100 * k + i)})
                    done += 1
                except Overloaded as e:  # admission control at work: come back later
                    await asyncio.sleep(e.retry_after_s)
            return done

        assert sum(await asyncio.gather(*[client(k) for k in range(12)])) > 0
        policy = s.engine.batcher("classifier", "1").policy
        decision = policy.decision()
        assert type(policy).__name__ == "AdaptivePolicy"
        assert decision.delay_s <= 0.3 * 0.2 + 1e-9
        assert decision.delay_s + 2 * policy.predict_service_s(decision.batch_size) <= 0.2

    run(main, example_repo)


def test_a_zero_dimensional_input_is_refused_as_invalid_not_a_crash() -> None:
    """A per-row scalar input (spec shape []) given as a 0-d array has no batch dimension: an
    InvalidInput naming the shape, not an IndexError."""
    from node_agent.runtime.engine import InputValidator

    config = ModelConfig(
        "scalar", "1", "torchscript", (TensorSpec("x", "FP32", ()),), (), "m.pt", "sha256:" + "0" * 64
    )
    validator = InputValidator(config)
    _, rows = validator.validate({"x": np.zeros((3,), np.float32)})
    assert rows == 3
    with pytest.raises(InvalidInput, match="batch dimension first"):
        validator.validate({"x": np.array(1.0, np.float32)})
