"""Hugging Face Llama-family checkpoints in our paged engine, proven against transformers.

Tiny random-weight checkpoints of Llama (llama3 RoPE scaling, rope_theta), Qwen2 (q/k/v
biases, tied embeddings) and Mistral, with grouped-query attention, are built with
`transformers` and saved as a user would download them. Tolerance: float32 logits equal
transformers' within atol 1e-4 at every position (paged prefill, chunked prefill and decode),
and greedy generation through the engine gives exactly transformers' `generate` tokens,
alone, with prefix sharing, and with preemption in the middle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from agent_runner import RunningAgent

from bench.hf_checkpoints import CHAT_TEMPLATE, write_checkpoint
from node_agent.agent import AgentSettings
from node_agent.errors import DigestMismatch, InsufficientMemory, InvalidModel
from node_agent.generation.async_generator import AsyncGenerator
from node_agent.generation.engine import EngineConfig, GenerationEngine, engine_for_backend
from node_agent.generation.hf_checkpoint import (
    HF_FORMAT,
    HFCheckpointBackend,
    load_hf_model,
    verify_checksums,
    write_hf_model,
)
from node_agent.generation.hf_llama import LlamaForPaged
from node_agent.generation.hf_tokenizer import HFTokenizer
from node_agent.generation.kv_cache import KVCacheConfig, KVCacheManager
from node_agent.generation.paged_attention import PagedBatch, PagedKVPool
from node_agent.generation.sampling_params import SamplingParams
from node_agent.runtime.backends import backend_for
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.serving.http import HttpSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = ("llama", "qwen2", "mistral")
Checkpoint = tuple[Path, Any]
"""(directory, the transformers model saved there)"""
Ours = tuple[LlamaForPaged, HFTokenizer]
ATOL = 1e-4
GREEDY = {"max_tokens": 12, "temperature": 0.0}
PROMPTS = [
    "the quick brown fox",
    "edge nodes serve models close to their users and",
    "hello",
    "a paged key value cache shares prompt prefixes between requests, so",
]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(directory, transformers model) of one family; Qwen2's embeddings are tied, Llama's
    weights are sharded (model.safetensors.index.json)."""
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    overrides: dict[str, Any] = {"tie_word_embeddings": True} if family == "qwen2" else {}
    shard = "100KB" if family == "llama" else None
    return directory, write_checkpoint(directory, family, seed=3, max_shard_size=shard, **overrides)


@pytest.fixture(scope="module")
def ours(checkpoint: Checkpoint) -> Ours:
    return load_hf_model(checkpoint[0])


def hf_greedy(hf: Any, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy generate, alone (batch 1, no padding); stops at EOS."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :]]


def run_engine(engine: GenerationEngine, prompts: list[list[int]], params: SamplingParams,
               stagger: int = 0) -> list[list[int]]:  # fmt: skip
    """Every prompt's output tokens; with `stagger`, prompt i joins after i * stagger steps."""
    ids: list[int | None] = [None] * len(prompts)
    out: dict[int, list[int]] = {}
    step = 0
    while True:
        for i, p in enumerate(prompts):
            if ids[i] is None and step >= i * stagger:
                ids[i] = engine.add(p, params)
                out[ids[i]] = []  # type: ignore[index]
        if not engine.has_work() and all(i is not None for i in ids):
            break
        for o in engine.step():
            if o.token_id is not None:
                out[o.seq_id].append(o.token_id)
        engine.check_invariants()
        step += 1
    return [out[i] for i in ids if i is not None]


def test_logits_equal_transformers_at_every_position(checkpoint: Checkpoint, ours: Ours) -> None:
    _, hf = checkpoint
    model, tok = ours
    ids = tok.encode(PROMPTS[3] + " " + PROMPTS[1])
    assert len(ids) > 20
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
        assert torch.allclose(model(torch.tensor([ids]))[0], expected, atol=ATOL, rtol=0)
        # paged: a chunk of prefill, the rest of the prompt continuing it, then decode rows
        kv = KVCacheManager(KVCacheConfig(64, block_size=4))
        pool = PagedKVPool(model.config, 64, 4)
        kv.allocate("a", ids[:9], len(ids))
        rows = [
            model.forward_paged(PagedBatch.build([(ids[:9], 9, kv.block_table("a"))]), pool, all_logits=True)
        ]
        kv.append_slots("a", ids[9:-3])
        n = len(ids) - 3
        rows.append(model.forward_paged(PagedBatch.build([(ids[9:n], n, kv.block_table("a"))]), pool,
                                        all_logits=True))  # fmt: skip
        for i in range(n, len(ids)):
            kv.append_slots("a", [ids[i]])
            rows.append(model.forward_paged(PagedBatch.build([([ids[i]], i + 1, kv.block_table("a"))]), pool))
    paged = torch.cat(rows)
    assert paged.shape == expected.shape
    err = (paged - expected).abs().max().item()
    assert err <= ATOL, f"max |logit error| {err}"


def test_greedy_generation_equals_transformers_generate(checkpoint: Checkpoint, ours: Ours) -> None:
    _, hf = checkpoint
    model, tok = ours
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, p, GREEDY["max_tokens"]) for p in prompts]
    engine = GenerationEngine(model, EngineConfig(128, block_size=4))
    got = run_engine(engine, prompts, SamplingParams(**GREEDY))
    assert got == expected
    assert engine.stats().requests_finished == len(prompts)


def test_prefix_sharing_gives_the_same_tokens(checkpoint: Checkpoint, ours: Ours) -> None:
    _, hf = checkpoint
    model, tok = ours
    shared = tok.encode(PROMPTS[3] + " " + PROMPTS[1])
    prompts = [
        shared + tok.encode(" fox", add_special_tokens=False),
        shared + tok.encode(" dog", add_special_tokens=False),
    ]
    expected = [hf_greedy(hf, p, GREEDY["max_tokens"]) for p in prompts]
    engine = GenerationEngine(model, EngineConfig(128, block_size=4))
    got = run_engine(engine, prompts, SamplingParams(**GREEDY), stagger=2)
    assert got == expected
    stats = engine.stats()
    prefill_computed = engine.computed_tokens - (stats.generation_tokens - len(prompts))
    assert stats.prompt_tokens - prefill_computed >= len(shared) // 4 * 4 - 4, "no shared prefix reused"


def test_preemption_in_the_middle_gives_the_same_tokens(checkpoint: Checkpoint, ours: Ours) -> None:
    _, hf = checkpoint
    model, tok = ours
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    need = max(-(-(len(p) + 16) // 4) for p in prompts)
    engine = GenerationEngine(model, EngineConfig(need + 3, block_size=4, enable_prefix_caching=False))
    got = run_engine(engine, prompts, params)
    assert engine.preemptions > 0, "the KV budget was meant to force preemption"
    for p, out in zip(prompts, got, strict=True):
        ref = hf_greedy(hf, p, 16)
        assert out[: len(ref)] == ref  # transformers stops at EOS; we ignored it


def test_int8_weights_take_a_quarter_and_stay_close(checkpoint: Checkpoint, ours: Ours) -> None:
    directory, _ = checkpoint
    model, tok = ours
    q, _ = load_hf_model(directory, quantization="int8")
    assert q.quantization == "int8"
    # int8 matrices plus float32 norms, row scales and RoPE tables: near a quarter even this small
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    assert q.weight_bytes() <= model.weight_bytes() - 3 * matrices + 4 * 2 * matrices // 64
    assert q.weight_bytes() < 0.35 * model.weight_bytes()
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        ref, got = model(ids), q(ids)
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_int4_group_weights_are_smaller_still_and_close(checkpoint: Checkpoint, ours: Ours) -> None:
    directory, _ = checkpoint
    model, tok = ours
    q8, _ = load_hf_model(directory, quantization="int8")
    q4, _ = load_hf_model(directory, quantization="int4")
    assert q4.quantization == "int4"
    assert q4.weight_bytes() < 0.8 * q8.weight_bytes()
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        ref, got8, got4 = model(ids), q8(ids), q4(ids)
    err8, err4 = (got8 - ref).abs().mean().item(), (got4 - ref).abs().mean().item()
    assert err8 < err4 < 0.35 * ref.abs().mean().item()  # 15 levels: ~11% error per weight
    # random weights give flat logits (top-1 flips on near ties): compare the logit vectors
    assert torch.nn.functional.cosine_similarity(got4, ref, dim=-1).min().item() > 0.9
    with pytest.raises(InvalidModel, match="quantization"):
        load_hf_model(directory, quantization="int3")


def test_int4_for_another_device_keeps_the_portable_layout(checkpoint: Checkpoint, ours: Ours) -> None:
    """int4 matrices in torch's CPU layout run on the CPU only: a model bound for another
    device is quantized to the portable layout, and both layouts compute the same model."""
    from node_agent.generation.hf_checkpoint import load_safetensors
    from node_agent.generation.hf_llama import LlamaShape
    from node_agent.generation.linear import INT4_KERNELS, Int4Linear

    directory, _ = checkpoint
    model, tok = ours
    shape = LlamaShape.from_hf(json.loads((directory / "config.json").read_text()))
    layouts = {}
    for for_cpu in (True, False):
        q = LlamaForPaged.from_hf_state(shape, load_safetensors(directory), quantization="int4",
                                        for_cpu=for_cpu)  # fmt: skip
        mats = [m for m in q.modules() if isinstance(m, Int4Linear)]
        assert mats, "no int4 matrix"
        layouts[for_cpu] = {m.torch_layout for m in mats}, q
    assert layouts[False][0] == {False}
    assert (True in layouts[True][0]) == INT4_KERNELS  # torch's layout wherever its kernel exists
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        ref, cpu, portable = model(ids), layouts[True][1](ids), layouts[False][1](ids)
    # the same int4 matrices; the CPU kernel rounds its inputs to bfloat16 (<1% of a logit)
    assert (cpu - portable).abs().max().item() < 0.02 * ref.abs().max().item()
    assert layouts[True][1].weight_bytes() == layouts[False][1].weight_bytes()


def test_tokenizer_and_chat_template_equal_transformers(checkpoint: Checkpoint, ours: Ours) -> None:
    from transformers import AutoTokenizer

    directory, _ = checkpoint
    _, tok = ours
    hf_tok = AutoTokenizer.from_pretrained(directory)
    for text in [*PROMPTS, "Grüße aus Köln ünïcödé"]:
        assert tok.encode(text) == hf_tok(text).input_ids
        assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True)
        stream = tok.incremental_decoder()
        assert "".join(stream.feed(t) for t in tok.encode(text)) + stream.flush() == text
    chats = [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "be brief "}, {"role": "user", "content": "how are you?"},
         {"role": "assistant", "content": "fine"}, {"role": "user", "content": "Grüße"}],
    ]  # fmt: skip
    for messages in chats:
        for gen in (True, False):
            assert tok.chat_template is not None
            text = tok.chat_template.render(messages, add_generation_prompt=gen)
            assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(ids)
    assert tok.chat_template.source == CHAT_TEMPLATE


def model_version(checkpoint: Checkpoint, root: Path, name: str, **kw: Any) -> Path:
    version_dir = root / name / "1"
    shutil.copytree(checkpoint[0], version_dir)
    write_hf_model(version_dir, name, **kw)
    return version_dir


def test_a_version_folder_loads_as_a_backend_and_generates(checkpoint: Checkpoint, tmp_path: Path) -> None:
    _, hf = checkpoint
    vdir = model_version(checkpoint, tmp_path, "lm", parameters={"kv_cache_bytes": "256Ki"})
    config = parse_model_config(vdir / "model.yaml")
    assert config.format == HF_FORMAT and config.task == "generate"
    backend = backend_for(config.format).load(config, vdir, "cpu")
    assert isinstance(backend, HFCheckpointBackend) and backend.model is not None
    assert backend.kv_cache_bytes <= 256 * 1024
    assert backend.memory_bytes == backend.model.weight_bytes() + backend.kv_cache_bytes
    ids = torch.tensor([backend.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.allclose(backend.run({"input_ids": ids})["logits"], hf(ids).logits, atol=ATOL, rtol=0)

    async def generate() -> str:
        gen = AsyncGenerator(engine_for_backend(backend))
        await gen.start()
        try:
            return (await gen.generate(PROMPTS[1], SamplingParams(**GREEDY))).text
        finally:
            await gen.stop()

    expected = hf_greedy(hf, backend.tokenizer.encode(PROMPTS[1]), GREEDY["max_tokens"])
    assert asyncio.run(generate()) == backend.tokenizer.decode(expected)
    q = backend_for(HF_FORMAT).load(
        parse_model_config(model_version(checkpoint, tmp_path, "q8", quantization="int8",
                                         parameters={"kv_cache_bytes": "256Ki"}) / "model.yaml"),
        tmp_path / "q8" / "1", "cpu",
    )  # fmt: skip
    assert q.memory_bytes - q.kv_cache_bytes < 0.35 * (backend.memory_bytes - backend.kv_cache_bytes)


def test_a_changed_checkpoint_file_is_refused(checkpoint: Checkpoint, tmp_path: Path) -> None:
    vdir = model_version(checkpoint, tmp_path, "lm")
    verify_checksums(vdir / "SHA256SUMS")
    config = parse_model_config(vdir / "model.yaml")
    cfg = json.loads((vdir / "config.json").read_text())
    (vdir / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(DigestMismatch, match=r"config\.json"):
        backend_for(HF_FORMAT).load(config, vdir, "cpu")
    with pytest.raises(InvalidModel, match="model_type"):
        (vdir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        load_hf_model(vdir)


def test_the_agent_serves_it_through_the_v2_generate_extension(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    import aiohttp

    root = tmp_path / "models"
    vdir = model_version(
        checkpoint, root, "chat", quantization="int8", parameters={"kv_cache_bytes": "512Ki"}
    )
    tok = HFTokenizer.from_dir(vdir)
    q, _ = load_hf_model(vdir, quantization="int8")
    prompt = tok.encode(PROMPTS[3])
    engine = GenerationEngine(q, EngineConfig(64, block_size=4))
    expected = run_engine(engine, [prompt], SamplingParams(**GREEDY))[0]
    http = HttpSettings(host="127.0.0.1", port=0, auth_token="t")
    agent = RunningAgent(AgentSettings(root, workers=1, thermal_source="off", http=http))
    try:

        async def post() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{agent.port}/v2/models/chat/generate",
                json={"text_input": PROMPTS[3], "parameters": GREEDY},
                headers={"Authorization": "Bearer t"},
            ) as resp:  # fmt: skip
                return resp.status, await resp.json()

        status, body = asyncio.run(post())
    finally:
        agent.close()
    assert status == 200, body
    assert body["token_ids"] == expected
    assert body["text_output"] == tok.decode(expected)
    assert body["prompt_tokens"] == len(prompt)


def test_the_openai_client_chats_with_it_through_its_own_chat_template(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """The official openai client against an agent serving the checkpoint: the messages are
    rendered by the checkpoint's chat template (transformers' `apply_chat_template` ids), and the
    answer is the engine's greedy tokens for them."""
    import openai

    root = tmp_path / "models"
    vdir = model_version(checkpoint, root, "chat", parameters={"kv_cache_bytes": "512Ki"})
    tok = HFTokenizer.from_dir(vdir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    model, _ = load_hf_model(vdir)
    expected = run_engine(
        GenerationEngine(model, EngineConfig(64, block_size=4)), [ids], SamplingParams(**GREEDY)
    )[0]
    agent = RunningAgent(
        AgentSettings(root, workers=1, thermal_source="off", http=HttpSettings(host="127.0.0.1", port=0))
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{agent.port}/v1", api_key="-", max_retries=0)
        done = client.chat.completions.create(model="chat", messages=messages, **GREEDY)  # type: ignore[arg-type]
        client.close()
    finally:
        agent.close()
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert done.usage.completion_tokens == len(expected)
    assert done.choices[0].message.content == tok.decode(expected)


def test_the_scheduler_budget_counts_int8_weights(checkpoint: Checkpoint, tmp_path: Path) -> None:
    """A budget between the int8 and the float32 model's measured bytes: the int8 version
    loads and is counted at its measured size; the float32 one is refused."""
    kv = {"kv_cache_bytes": "64Ki"}
    dirs = {
        q: model_version(checkpoint, tmp_path, f"m{q}", quantization=q, parameters=kv)
        for q in ("none", "int8")
    }
    configs = {q: parse_model_config(d / "model.yaml") for q, d in dirs.items()}
    sizes = {q: backend_for(HF_FORMAT).load(configs[q], dirs[q], "cpu").memory_bytes for q in dirs}
    assert sizes["int8"] < 0.35 * sizes["none"] + 64 * 1024

    async def run() -> tuple[int | None, int]:
        loads = {configs[q].id: dirs[q] for q in dirs}
        sched = ModelScheduler((sizes["int8"] + sizes["none"]) // 2,
                               lambda c: backend_for(c.format).load(c, loads[c.id], "cpu"))  # fmt: skip
        with pytest.raises(InsufficientMemory):
            await sched.acquire(dataclasses.replace(configs["none"], memory_estimate_bytes=0))
        lease = await sched.acquire(configs["int8"])
        try:
            return sched.measured_bytes(configs["int8"].id), sched.used_bytes
        finally:
            lease.release()

    measured, used = asyncio.run(run())
    assert measured == used == sizes["int8"]


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "default"}],
    ids=["plain", "linear", "default"],
)
def test_rope_variants_and_biases_equal_transformers(rope: dict[str, Any] | None) -> None:
    """Llama with plain or linearly scaled RoPE, q/k/v/o and MLP biases (attention_bias,
    mlp_bias), and one KV head (multi-query attention)."""
    from transformers import AutoModelForCausalLM

    from bench.hf_checkpoints import hf_config
    from node_agent.generation.hf_llama import LlamaShape

    cfg = hf_config("llama", 97, rope_scaling=rope, attention_bias=True, mlp_bias=True, num_key_value_heads=1)
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    model = LlamaForPaged.from_hf_state(LlamaShape.from_hf(cfg.to_dict()), hf.state_dict())
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_unsupported_configs_are_refused() -> None:
    from node_agent.generation.hf_llama import LlamaShape

    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    assert LlamaShape.from_hf(base).n_kv_heads == 2
    for bad, match in (
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "inconsistent"),
        ({"model_type": "gpt2"}, "model_type"),
    ):
        with pytest.raises(InvalidModel, match=match):
            LlamaShape.from_hf({**base, **bad})


def test_the_command_line_makes_a_folder_a_version(checkpoint: Checkpoint, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from node_agent.generation.hf_checkpoint import main

    vdir = tmp_path / "qwen" / "2"
    shutil.copytree(checkpoint[0], vdir)
    assert main([str(vdir), "qwen", "2", "--quantization", "int8", "--max-context", "128"]) == 0
    config = parse_model_config(vdir / "model.yaml")
    assert config.digest in capsys.readouterr().out
    assert (config.format, config.parameters["quantization"], config.parameters["max_context"]) == (
        HF_FORMAT, "int8", "128")  # fmt: skip
    backend = backend_for(HF_FORMAT).load(config, vdir, "cpu")
    assert backend.model is not None and backend.model.config.max_seq_len == 128


def test_bfloat16_weights_take_half_and_generate(checkpoint: Checkpoint, ours: Ours) -> None:
    directory, _ = checkpoint
    model, tok = ours
    bf, _ = load_hf_model(directory, dtype=torch.bfloat16)
    assert bf.weight_bytes() < 0.55 * model.weight_bytes()
    ids = tok.encode(PROMPTS[1])
    with torch.no_grad():
        ref, got = model(torch.tensor([ids])), bf(torch.tensor([ids]))
    assert got.dtype == torch.float32  # logits are float32 whatever the compute dtype
    assert (got - ref).abs().mean().item() < 0.03 * ref.abs().mean().item()
    engine = GenerationEngine(bf, EngineConfig(64, block_size=4))
    paged = run_engine(engine, [ids], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert paged == [int(got[0, -1].argmax())]
