"""TinyLM: paged attention (through block tables, with prefix sharing and copy-on-write)
gives the logits of the plain model; weights round-trip without pickle."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from node_agent.errors import InvalidInput, InvalidModel
from node_agent.generation.kv_cache import KVCacheConfig, KVCacheManager, block_size_for_context
from node_agent.generation.transformer import (
    BOS,
    DEFAULT_KV_CONTEXTS,
    EOS,
    KV_BLOCK_SIZE_PARAMETER,
    KV_CACHE_PARAMETER,
    TINY_LM_FORMAT,
    ByteTokenizer,
    PagedBatch,
    PagedKVPool,
    TinyLM,
    TinyLMBackend,
    TinyLMConfig,
    kv_block_size_for,
    kv_cache_bytes_for,
    load_tiny_lm,
    save_tiny_lm,
    write_tiny_lm,
)
from node_agent.runtime.repository import sha256_file
from node_agent.types import ModelConfig

CFG = TinyLMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
BS = 4
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> TinyLM:
    return TinyLM.random(CFG, seed=11)


def dense(model: TinyLM, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


def rand_tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def paged(model: TinyLM, batch: PagedBatch, pool: PagedKVPool, **kw: bool) -> torch.Tensor:
    with torch.inference_mode():
        return model.forward_paged(batch, pool, **kw)


def test_prefill_of_several_sequences_matches_the_plain_model(model: TinyLM) -> None:
    kv = KVCacheManager(KVCacheConfig(64, BS, hash_seed=1))
    pool = PagedKVPool(CFG, 64, BS)
    seqs = {"a": rand_tokens(1, 13), "b": rand_tokens(2, 1), "c": rand_tokens(3, 8)}
    for sid, toks in seqs.items():
        kv.allocate(sid, toks, 4)
    batch = PagedBatch.build([(t, len(t), kv.block_table(s)) for s, t in seqs.items()])
    out = paged(model, batch, pool, all_logits=True)
    rows = iter(out)
    for toks in seqs.values():
        got = torch.stack([next(rows) for _ in toks])
        assert torch.allclose(got, dense(model, toks), atol=TOL)
    # Block tables are not contiguous: "a" holds blocks 0-3, "b" 4, "c" 5-6.
    assert kv.block_table("b") == (4,)


@pytest.mark.parametrize("block_size", [1, BS, 16])
def test_decode_steps_of_a_mixed_batch_match_the_plain_model(model: TinyLM, block_size: int) -> None:
    kv = KVCacheManager(KVCacheConfig(64, block_size, hash_seed=1))
    pool = PagedKVPool(CFG, 64, block_size)
    full = {"a": rand_tokens(4, 20), "b": rand_tokens(5, 15), "c": rand_tokens(6, 9)}
    prompt = {"a": 9, "b": 3, "c": 9}
    done = dict.fromkeys(full, 0)
    for sid in full:
        kv.allocate(sid, full[sid][: prompt[sid]], 16)
    # Step 1: prefill a, b; later steps: one token each, c's prefill joins at step 3.
    for step in range(8):
        entries, order = [], []
        for sid in full:
            if sid == "c" and step < 3:
                continue
            if done[sid] == 0:
                toks = full[sid][: prompt[sid]]
            elif done[sid] < len(full[sid]):
                toks = [full[sid][done[sid]]]
                kv.append_slots(sid, toks)
            else:
                continue
            entries.append((toks, done[sid] + len(toks), kv.block_table(sid)))
            order.append(sid)
            done[sid] += len(toks)
        last = paged(model, PagedBatch.build(entries), pool)
        for sid, row in zip(order, last, strict=True):
            ref = dense(model, full[sid][: done[sid]])[-1]
            assert torch.allclose(row, ref, atol=TOL), (step, sid)
        kv.check_invariants()


def test_shared_prefix_blocks_and_copy_on_write_keep_each_sequence_exact(model: TinyLM) -> None:
    kv = KVCacheManager(KVCacheConfig(32, BS, hash_seed=1))
    pool = PagedKVPool(CFG, 32, BS)
    prompt = rand_tokens(7, 10)  # two full blocks and a partial one
    kv.allocate("p", prompt, 8)
    paged(model, PagedBatch.build([(prompt, 10, kv.block_table("p"))]), pool)
    kv.fork("p", "c")
    assert kv.block_table("c") == kv.block_table("p")
    tails = {"p": [11, 12, 13], "c": [200, 201, 202]}
    for i in range(3):
        entries = []
        for sid in ("c", "p"):  # the child writes first: it must copy the shared block
            r = kv.append_slots(sid, [tails[sid][i]])
            assert r is not None
            pool.copy_blocks(r.copies)
            if i == 0 and sid == "c":
                assert len(r.copies) == 1
            entries.append(([tails[sid][i]], 11 + i, kv.block_table(sid)))
        last = paged(model, PagedBatch.build(entries), pool)
        for sid, row in zip(("c", "p"), last, strict=True):
            ref = dense(model, prompt + tails[sid][: i + 1])[-1]
            assert torch.allclose(row, ref, atol=TOL), (i, sid)
    assert kv.block_table("c")[:2] == kv.block_table("p")[:2]
    assert kv.block_table("c")[2] != kv.block_table("p")[2]
    # A new request with the same first two blocks computes only its own tokens.
    other = [*prompt[:8], 42, 43, 44]
    alloc = kv.allocate("o", other, 4)
    assert alloc is not None and alloc.num_cached_tokens == 8
    row = paged(model, PagedBatch.build([(other[8:], len(other), alloc.block_table)]), pool)[0]
    assert torch.allclose(row, dense(model, other)[-1], atol=TOL)
    kv.check_invariants()


def test_forward_paged_refuses_a_table_too_short_for_the_context(model: TinyLM) -> None:
    pool = PagedKVPool(CFG, 4, BS)
    with pytest.raises(ValueError, match="needs more than"):
        paged(model, PagedBatch.build([([1, 2, 3, 4, 5], 5, [0])]), pool)
    with pytest.raises(ValueError):
        PagedBatch.build([([1, 2], 1, [0])])


def test_weights_round_trip_without_pickle_and_bytes_are_stable(model: TinyLM, tmp_path: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_tiny_lm(model, a)
    save_tiny_lm(TinyLM.random(CFG, seed=11), b)
    assert a.read_bytes() == b.read_bytes()
    with np.load(a, allow_pickle=False) as data:  # would raise on any object array
        assert all(data[k].dtype != object for k in data.files)
    loaded = load_tiny_lm(a)
    assert loaded.config == CFG
    toks = rand_tokens(8, 12)
    assert torch.equal(dense(loaded, toks), dense(model, toks))
    with zipfile.ZipFile(a) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidModel):
        load_tiny_lm(tmp_path / "bad.npz")


def test_write_tiny_lm_writes_a_generate_model_with_its_digest(tmp_path: Path) -> None:
    config = write_tiny_lm(tmp_path)
    version_dir = tmp_path / "tiny-lm" / "1"
    doc = yaml.safe_load((version_dir / "model.yaml").read_text())
    assert (doc["task"], doc["format"], doc["digest"]) == ("generate", TINY_LM_FORMAT, config.digest)
    assert sha256_file(version_dir / config.artifact) == config.digest
    backend = TinyLMBackend.load(config, version_dir, "cpu")
    ids = torch.tensor([ByteTokenizer.encode("hi there")])
    logits = backend.run({"input_ids": ids})["logits"]
    assert logits.shape == (1, 9, 259)
    assert torch.equal(logits, dense(load_tiny_lm(version_dir / config.artifact), ids[0].tolist())[None])
    with pytest.raises(InvalidInput):
        backend.run({"input_ids": torch.tensor([[300]])})
    lm = backend.model
    assert lm is not None
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    kv = DEFAULT_KV_CONTEXTS * 512 * 2 * 2 * 64 * 4  # contexts x tokens x K,V x layers x d_model x fp32
    assert backend.kv_cache_bytes == kv == int(doc["parameters"][KV_CACHE_PARAMETER])
    assert backend.memory_bytes == weights + kv == config.memory_estimate_bytes
    predict = TinyLMBackend.load(dataclasses.replace(config, task="predict"), version_dir, "cpu")
    assert (predict.kv_cache_bytes, predict.memory_bytes) == (0, weights)
    backend.unload()
    with pytest.raises(InvalidModel):
        backend.run({"input_ids": ids})


def test_tokenizer_round_trips_text_and_streams_whole_characters() -> None:
    text = "héllo → 世界"
    ids = ByteTokenizer.encode(text)
    assert ids[0] == BOS and ByteTokenizer.decode([*ids, EOS]) == text
    dec = ByteTokenizer.incremental_decoder()
    pieces = [dec.feed(t) for t in ids[1:]]
    assert "".join(pieces) + dec.flush() == text
    assert pieces[1:3] == ["", "é"]  # the two bytes of é arrive as one piece


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_attention_on_cuda_matches_the_cpu_model(model: TinyLM) -> None:
    gpu = TinyLM.random(CFG, seed=11).cuda()
    kv = KVCacheManager(KVCacheConfig(16, BS, hash_seed=1))
    pool = PagedKVPool(CFG, 16, BS, device="cuda")
    toks = rand_tokens(9, 11)
    kv.allocate("a", toks[:10], 4)
    paged(gpu, PagedBatch.build([(toks[:10], 10, kv.block_table("a"))]), pool)
    kv.append_slots("a", toks[10:])
    row = paged(gpu, PagedBatch.build([(toks[10:], 11, kv.block_table("a"))]), pool)[0]
    assert torch.allclose(row.cpu(), dense(model, toks)[-1], atol=1e-3)


def test_kv_cache_bytes_come_from_the_model_parameters() -> None:
    config = generate_config()
    assert kv_block_size_for(config, CFG) == block_size_for_context(CFG.max_seq_len) == 4
    block = 4 * 2 * CFG.n_layers * CFG.d_model * 4  # 4 tokens of K and V, fp32
    assert kv_cache_bytes_for(config, CFG) == DEFAULT_KV_CONTEXTS * (CFG.max_seq_len // 4) * block
    assert kv_cache_bytes_for(with_kv(config, "64Ki"), CFG) == 65536 // block * block
    assert kv_cache_bytes_for(with_kv(config, str(block * 3 + 5)), CFG) == 3 * block  # whole blocks
    assert kv_cache_bytes_for(dataclasses.replace(config, task="predict"), CFG) == 0
    with pytest.raises(InvalidModel, match=r"kv_cache_bytes.*byte quantity"):
        kv_cache_bytes_for(with_kv(config, "lots"), CFG)
    with pytest.raises(InvalidModel, match="less than one KV block"):
        kv_cache_bytes_for(with_kv(config, str(block - 1)), CFG)


def test_kv_block_size_is_the_context_rule_unless_the_model_sets_it() -> None:
    config = generate_config()
    sixteen = dataclasses.replace(config, parameters={KV_BLOCK_SIZE_PARAMETER: "16"})
    assert kv_block_size_for(sixteen, CFG) == 16
    block16 = 16 * 2 * CFG.n_layers * CFG.d_model * 4
    # The budget is whole blocks of the model's block size: 3.5 blocks of 16 keep 3.
    budget = dataclasses.replace(
        sixteen, parameters={**sixteen.parameters, KV_CACHE_PARAMETER: str(block16 * 7 // 2)}
    )
    assert kv_cache_bytes_for(budget, CFG) == 3 * block16
    for bad in ("0", "-4", "four", "129"):  # 129 > the 128-token context
        with pytest.raises(InvalidModel, match=KV_BLOCK_SIZE_PARAMETER):
            kv_block_size_for(dataclasses.replace(config, parameters={KV_BLOCK_SIZE_PARAMETER: bad}), CFG)


def generate_config() -> ModelConfig:
    return ModelConfig("lm", "1", TINY_LM_FORMAT, (), (), "model.npz", "sha256:" + "0" * 64, task="generate")


def with_kv(config: ModelConfig, value: str) -> ModelConfig:
    return dataclasses.replace(config, parameters={KV_CACHE_PARAMETER: value})
