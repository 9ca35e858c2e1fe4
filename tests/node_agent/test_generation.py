"""Generation engine: exact greedy output, sampling reproducible across preemption,
continuous batching, refusals, and the asyncio front (generate, stream, abort)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact, GenerationSettings
from node_agent.errors import InferenceFailed, InvalidInput, InvalidModel, ShuttingDown
from node_agent.generation.async_generator import AsyncGenerator, load_generator
from node_agent.generation.engine import (
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    ContextTooLong,
    EngineConfig,
    GenerationEngine,
    engine_for_backend,
)
from node_agent.generation.kv_cache import SequenceTooLong, block_size_for_context
from node_agent.generation.sampling import sample_token, sample_tokens
from node_agent.generation.sampling_params import SamplingParams
from node_agent.generation.transformer import (
    KV_BLOCK_SIZE_PARAMETER,
    ByteTokenizer,
    TinyLM,
    TinyLMBackend,
    TinyLMConfig,
    kv_cache_bytes_for,
    load_tiny_lm,
    write_tiny_lm,
)
from node_agent.link.assignment import effective_config
from node_agent.types import MAX_TOKENS_PARAMETER

CFG = TinyLMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
PROMPTS = ["hello there", "the quick brown fox jumps", "hello there, general", "zzz"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> TinyLM:
    return TinyLM.random(CFG, seed=3)


def engine(model: TinyLM, num_blocks: int = 128, **kw: object) -> GenerationEngine:
    return GenerationEngine(model, EngineConfig(num_blocks, block_size=4, **kw))  # type: ignore[arg-type]


def run_all(
    eng: GenerationEngine, prompts: list[str], params: list[SamplingParams], **add: float
) -> list[list[int]]:
    """Add every prompt (`add`: e.g. arrival_s), step until done; each one's tokens."""
    ids = [eng.add(ByteTokenizer.encode(p), sp, **add) for p, sp in zip(prompts, params, strict=True)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while eng.has_work():
        for o in eng.step():
            assert o.token_id is not None
            out[o.seq_id].append(o.token_id)
        eng.check_invariants()
    return [out[i] for i in ids]


def greedy_reference(model: TinyLM, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks]))[0, -1].argmax()))
    return toks[len(prompt) :]


def sampled(seed: int, n: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)


# -- sampling ----------------------------------------------------------------------------


def test_sample_token_greedy_top_p_and_seeds() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=0.0), g) == 1
    assert {sample_token(logits, SamplingParams(top_p=0.01), g) for _ in range(20)} == {1}
    draws = {sample_token(logits, SamplingParams(top_p=0.7), g) for _ in range(200)}
    assert draws == {1, 3}  # 1 and 3 hold > 70% of the mass; 0 and 2 are cut
    a = [sample_token(logits, SamplingParams(), torch.Generator().manual_seed(5)) for _ in range(3)]
    g5 = torch.Generator().manual_seed(5)
    b = [sample_token(logits, SamplingParams(), g5) for _ in range(30)]
    assert a == [b[0]] * 3 and len(set(b)) > 1


def test_batched_sampling_gives_each_row_what_it_gives_alone() -> None:
    """A row's token depends on its own logits, params and generator only: the batch it is
    sampled in does not change it, and only sampled rows draw from their generator."""
    logits = torch.randn(6, 259, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7),
              SamplingParams(top_p=0.5), SamplingParams(temperature=1.3, top_p=0.9),
              SamplingParams(), SamplingParams(temperature=0.0)]  # fmt: skip
    for trial in range(20):
        alone = [sample_token(row, p, torch.Generator().manual_seed(trial * 10 + i))
                 for i, (row, p) in enumerate(zip(logits, params, strict=True))]  # fmt: skip
        gens = [torch.Generator().manual_seed(trial * 10 + i) for i in range(6)]
        assert sample_tokens(logits, params, gens) == alone
        # Greedy rows drew nothing; sampled rows drew exactly one uniform each.
        fresh = [torch.Generator().manual_seed(trial * 10 + i) for i in range(6)]
        for i, (g, f) in enumerate(zip(gens, fresh, strict=True)):
            if params[i].temperature != 0.0:
                torch.rand((), generator=f)
            assert torch.equal(g.get_state(), f.get_state()), i
    assert alone[0] == int(logits[0].argmax()) and alone[5] == int(logits[5].argmax())
    # Odd rows alone in a smaller batch give the same tokens.
    odd = [1, 3, 5]
    gens = [torch.Generator().manual_seed(190 + i) for i in odd]
    assert sample_tokens(logits[odd], [params[i] for i in odd], gens) == [alone[i] for i in odd]
    with pytest.raises(ValueError):
        sample_tokens(logits, params[:2], gens)


def test_sampling_params_validation() -> None:
    p = SamplingParams.from_mapping({"max_tokens": 5, "temperature": 0, "seed": 1, "priority": "high"})
    assert (p.max_tokens, p.temperature, p.seed, int(p.priority)) == (5, 0.0, 1, 1)
    for bad in ({"max_tokens": 0}, {"top_p": 0}, {"temperature": -1}, {"max_tokens": 1.5},
                {"bogus": 1}, {"stop_token_ids": "x"}, {"priority": "urgent"}, {"seed": True}):  # fmt: skip
        with pytest.raises(InvalidInput):
            SamplingParams.from_mapping(bad)


# -- the engine ----------------------------------------------------------------------------


def test_greedy_generation_equals_the_plain_model_decoding_alone(model: TinyLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = run_all(engine(model), PROMPTS, [params] * len(PROMPTS))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out == greedy_reference(model, ByteTokenizer.encode(prompt), 12)


def test_preemption_and_recompute_give_the_same_text_as_an_uninterrupted_run(model: TinyLM) -> None:
    params = [sampled(seed=100 + i) for i in range(len(PROMPTS))]
    roomy = engine(model, num_blocks=128)
    want = run_all(roomy, PROMPTS, params)
    assert roomy.preemptions == 0
    tight = engine(model, num_blocks=14)  # 56 slots for 4 sequences of up to 50 tokens
    got = run_all(tight, PROMPTS, params)
    assert tight.preemptions > 0
    assert got == want
    # Recompute shows in the tokens run through the model; the roomy run computes each
    # prompt (less prefix-cache hits) and feeds back 23 of each 24 outputs.
    prompts = sum(len(ByteTokenizer.encode(p)) for p in PROMPTS)
    assert roomy.computed_tokens <= prompts + 4 * 23 < tight.computed_tokens
    assert len({tuple(o) for o in got}) == len(PROMPTS)  # real samples, not one repeated token
    s = tight.stats()
    assert (s.running, s.waiting, s.kv_blocks_used, s.requests_finished) == (0, 0, 0, 4)
    assert s.generation_tokens == 4 * 24 and s.ttft_count == 4 and s.tpot_count == 4 * 23


def test_preemption_with_tied_arrivals_and_priorities_keeps_outputs_exact(model: TinyLM) -> None:
    prompts = [f"request {i} " * (1 + i % 3) for i in range(8)]
    prios = ["low", "high", "normal", "low", "critical", "normal", "high", "low"]

    def run(num_blocks: int) -> tuple[list[list[int]], int]:
        eng = engine(model, num_blocks=num_blocks)
        params = [
            SamplingParams.from_mapping({"max_tokens": 20, "seed": i, "ignore_eos": True, "priority": prio})
            for i, prio in enumerate(prios)
        ]
        return run_all(eng, prompts, params, arrival_s=0.0), eng.preemptions

    want, none = run(256)
    got, some = run(20)
    assert none == 0 and some > 0
    assert got == want


def test_a_request_arriving_mid_way_joins_without_waiting(model: TinyLM) -> None:
    for mode in ("continuous", "static"):
        eng = engine(model, batching=mode)
        a = eng.add(ByteTokenizer.encode("long running"), sampled(1, n=30))
        for _ in range(5):
            eng.step()
        b = eng.add(ByteTokenizer.encode("late"), sampled(2, n=3))
        first_b, finished = None, []
        step = 0
        while eng.has_work():
            step += 1
            for o in eng.step():
                if o.seq_id == b and first_b is None:
                    first_b = step
                if o.finish_reason is not None:
                    finished.append(o.seq_id)
        if mode == "continuous":
            assert first_b == 1 and finished == [b, a]  # joined at once, left at once
        else:
            assert first_b == 26 and finished == [a, b]  # waited for the batch to drain


def test_stop_tokens_and_eos_end_a_sequence(model: TinyLM) -> None:
    prompt = ByteTokenizer.encode("hello")
    ref = greedy_reference(model, prompt, 6)
    eng = engine(model)
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(ref[2],))
    sid = eng.add(prompt, params)
    outs = []
    while eng.has_work():
        outs += eng.step()
    stop_at = ref.index(ref[2])
    assert [o.token_id for o in outs] == ref[: stop_at + 1]
    assert outs[-1].finish_reason == "stop" and outs[-1].seq_id == sid
    assert eng.stats().kv_blocks_used == 0


def test_impossible_requests_are_refused_at_once(model: TinyLM) -> None:
    eng = engine(model, num_blocks=8)  # 32 token slots
    with pytest.raises(SequenceTooLong, match="8"):
        eng.add(ByteTokenizer.encode("x" * 20), SamplingParams(max_tokens=20))
    with pytest.raises(ContextTooLong):
        engine(model).add([1] * 100, SamplingParams(max_tokens=29))
    with pytest.raises(InvalidInput):
        eng.add([], SamplingParams())
    with pytest.raises(InvalidInput):
        eng.add([999], SamplingParams())
    assert not eng.has_work()
    eng.add(ByteTokenizer.encode("x" * 20), SamplingParams(max_tokens=11))  # BOS + 20 + 11 = 32 fits


def test_preallocating_to_max_length_admits_fewer_sequences(model: TinyLM) -> None:
    paged, prealloc = engine(model, num_blocks=64), engine(model, num_blocks=64, kv_reservation="max_length")
    for eng in (paged, prealloc):
        for p in PROMPTS:
            eng.add(ByteTokenizer.encode(p), sampled(0, n=8))
        eng.step()
    assert paged.stats().running == 4
    assert prealloc.stats().running == 2  # 64 blocks / 32 blocks per 128-token context


def test_a_failing_forward_pass_fails_its_sequences_and_frees_their_blocks(model: TinyLM) -> None:
    eng = engine(model)
    eng.add(ByteTokenizer.encode("abc"), sampled(0))

    def broken(*_a: object, **_k: object) -> torch.Tensor:
        raise RuntimeError("device lost")

    eng.model = TinyLM.random(CFG, seed=3)
    eng.model.forward_paged = broken  # type: ignore[method-assign]
    (out,) = eng.step()
    assert out.finish_reason == "error" and out.error is not None and "device lost" in out.error
    assert not eng.has_work() and eng.stats().kv_blocks_used == 0
    eng.check_invariants()


# -- asyncio front ---------------------------------------------------------------------------


def test_async_generate_and_stream_match_the_engine(model: TinyLM) -> None:
    want = run_all(engine(model), PROMPTS, [sampled(7 + i) for i in range(len(PROMPTS))])

    async def main() -> None:
        gen = AsyncGenerator(engine(model))
        await gen.start()
        results = await asyncio.gather(*(gen.generate(p, sampled(7 + i)) for i, p in enumerate(PROMPTS[:3])))
        events = [ev async for ev in gen.stream(PROMPTS[3], sampled(10))]
        for r, w in zip(results, want, strict=False):
            assert list(r.token_ids) == w and r.text == ByteTokenizer.decode(w)
            assert r.completion_tokens == 24 and r.finish_reason == "length"
            assert 0 < r.time_to_first_token_s <= r.total_s
        assert results[0].prompt_tokens == len(ByteTokenizer.encode(PROMPTS[0]))
        assert [e.token_id for e in events] == want[3]
        assert [e.index for e in events] == list(range(24))
        assert "".join(e.text for e in events) == ByteTokenizer.decode(want[3])
        assert events[-1].finish_reason == "length" and events[0].finish_reason is None
        await gen.stop()
        with pytest.raises(ShuttingDown):
            await gen.generate("x", sampled(0))

    asyncio.run(main())


def test_closing_a_stream_early_aborts_the_request(model: TinyLM) -> None:
    async def main() -> None:
        gen = AsyncGenerator(engine(model))
        await gen.start()
        stream = gen.stream("abort me", sampled(1, n=100))
        first = await anext(stream)
        assert first.index == 0
        await stream.aclose()
        for _ in range(200):
            s = gen.stats()
            if s.running == 0 and s.waiting == 0:
                break
            await asyncio.sleep(0.01)
        s = gen.stats()
        assert (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)
        assert s.generation_tokens < 100
        await gen.stop()

    asyncio.run(main())


def test_a_model_failure_reaches_the_caller(model: TinyLM) -> None:
    async def main() -> None:
        eng = engine(model)
        eng.model = TinyLM.random(CFG, seed=3)

        def broken(*_a: object, **_k: object) -> torch.Tensor:
            raise RuntimeError("boom")

        eng.model.forward_paged = broken  # type: ignore[method-assign]
        gen = AsyncGenerator(eng)
        await gen.start()
        with pytest.raises(InferenceFailed, match="boom"):
            await gen.generate("x", sampled(0))
        await gen.stop()

    asyncio.run(main())


def test_a_generator_whose_engine_broke_refuses_new_requests(model: TinyLM) -> None:
    """An engine bug ends the loop: requests in progress fail, and later ones are refused
    at once instead of waiting for a loop that is gone."""

    async def main() -> None:
        eng = engine(model)

        def bug() -> list[object]:
            raise AssertionError("engine invariant broken")

        eng.step = bug  # type: ignore[assignment,method-assign]
        gen = AsyncGenerator(eng)
        await gen.start()
        assert gen.running
        with pytest.raises(InferenceFailed, match="invariant"):
            await gen.generate("x", sampled(0))
        assert not gen.running
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(gen.generate("y", sampled(0)), 5)
        await gen.stop()

    asyncio.run(main())


def test_time_to_first_token_and_per_output_token_are_bucketed(model: TinyLM) -> None:
    now = [0.0]
    eng = GenerationEngine(model, EngineConfig(64, block_size=4), clock=lambda: now[0])
    for i in range(2):
        eng.add(ByteTokenizer.encode(PROMPTS[i]), sampled(i, n=5), arrival_s=0.0)
    now[0] = 0.02  # both prefills sample their first token at 20 ms
    eng.step()
    for _ in range(4):
        now[0] += 0.004  # then a token every 4 ms
        eng.step()
    s = eng.stats()
    assert not eng.has_work() and (s.ttft_count, s.tpot_count) == (2, 8)
    assert s.ttft_buckets_s == TTFT_BUCKETS_S and s.tpot_buckets_s == TPOT_BUCKETS_S
    assert s.ttft_bucket_counts[TTFT_BUCKETS_S.index(0.025)] == 2 == sum(s.ttft_bucket_counts)
    assert s.tpot_bucket_counts[TPOT_BUCKETS_S.index(0.005)] == 8 == sum(s.tpot_bucket_counts)
    assert len(s.ttft_bucket_counts) == len(TTFT_BUCKETS_S) + 1
    assert s.ttft_s_sum == pytest.approx(0.04) and s.tpot_s_sum == pytest.approx(0.032)


def test_engine_for_backend_fills_the_backends_kv_budget(tmp_path: Path) -> None:
    config = write_tiny_lm(tmp_path)
    backend = TinyLMBackend.load(config, tmp_path / "tiny-lm" / "1", "cpu")
    eng = engine_for_backend(backend, max_num_seqs=8)
    assert backend.kv_cache_bytes == kv_cache_bytes_for(config, eng.model.config) > 0
    assert eng.pool.nbytes == backend.kv_cache_bytes  # the pool the scheduler was told about
    assert eng.model is backend.model and eng.config.max_num_seqs == 8
    # The block size is the rule for its 512-token context, unless model.yaml sets one.
    assert eng.config.block_size == backend.kv_block_size == block_size_for_context(512) == 4
    sixteen = dataclasses.replace(config, parameters={**config.parameters, KV_BLOCK_SIZE_PARAMETER: "16"})
    eng16 = engine_for_backend(TinyLMBackend.load(sixteen, tmp_path / "tiny-lm" / "1", "cpu"))
    assert eng16.config.block_size == 16 and eng16.pool.nbytes == backend.kv_cache_bytes
    with pytest.raises(InvalidInput, match="does not generate"):
        engine_for_backend(TinyLMBackend(dataclasses.replace(config, task="predict"), eng.model, 0))
    backend.unload()
    with pytest.raises(InvalidModel, match="unloaded"):
        engine_for_backend(backend)


def test_a_services_generation_settings_reach_the_engine(tmp_path: Path) -> None:
    """EdgeNode spec models[].generation -> the link's effective config (parameters) -> the engine:
    kvBlockTokens the block size, maxSequences the decode batch, maxTokens the cap on a request."""
    config = write_tiny_lm(tmp_path)
    entry = ModelAssignment(
        "shop/llm", "tiny-lm", "1", Artifact("repo://tiny-lm/1/model.npz", config.digest),
        format="tinylm-npz", task="generate", generation=GenerationSettings(max_tokens=8, max_sequences=3,
                                                                           kv_block_tokens=16),
    )  # fmt: skip
    effective = effective_config(config, entry)
    eng = engine_for_backend(TinyLMBackend.load(effective, tmp_path / "tiny-lm" / "1", "cpu"))
    assert (eng.config.block_size, eng.config.max_num_seqs, eng.config.max_new_tokens) == (16, 3, 8)
    eng.check_request([1, 2, 3], SamplingParams(max_tokens=8))
    with pytest.raises(InvalidInput, match="above this model's limit of 8"):
        eng.check_request([1, 2, 3], SamplingParams(max_tokens=9))
    bad = dataclasses.replace(effective, parameters={**effective.parameters, MAX_TOKENS_PARAMETER: "lots"})
    with pytest.raises(InvalidModel, match="max_tokens must be an integer"):
        engine_for_backend(TinyLMBackend.load(bad, tmp_path / "tiny-lm" / "1", "cpu"))


def test_load_generator_serves_the_written_example(tmp_path: Path) -> None:
    config = write_tiny_lm(tmp_path)
    version_dir = tmp_path / "tiny-lm" / "1"
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def main() -> list[int]:
        gen = load_generator(version_dir, config, kv_budget_bytes=1 << 20, max_num_seqs=4)
        assert gen.engine.config.max_num_seqs == 4 and gen.engine.config.block_size == 4
        await gen.start()
        result = await gen.generate("hi", params)
        await gen.stop()
        return list(result.token_ids)

    model = load_tiny_lm(version_dir / config.artifact)
    assert asyncio.run(main()) == greedy_reference(model, ByteTokenizer.encode("hi"), 6)
