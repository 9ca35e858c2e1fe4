"""A Hugging Face Llama checkpoint in our paged engine vs transformers' own `generate`.

    python -m bench.llm_engine                # full run (a few minutes of CPU, one core)
    BENCH_QUICK=1 python -m bench.llm_engine  # a smoke test

The checkpoint: a Llama of ~7 M parameters (hidden 256, 4 layers, 8 heads over 4 KV heads,
SwiGLU 688, vocabulary 8192, untied head) with random weights at a fixed seed, saved with
`transformers` and loaded by our `hf_checkpoint` (a byte-level BPE tokenizer gives the
prompts real token lengths). Both sides compute in float32 on the CPU with one torch thread,
greedy, every request producing exactly `OUTPUT_TOKENS` tokens (EOS ignored), so tokens are
equal work on both sides and are compared token for token.

- batch 1: one request at a time (ours: the engine with one sequence; transformers:
  `generate` on one unpadded prompt).
- 16 concurrent, equal lengths: 16 requests of different prompt lengths at once, each
  asking for `OUTPUT_TOKENS` (ours: all added at t=0, continuous batching over the paged KV
  cache; transformers: one `generate` call on the 16 prompts left-padded, its static batch,
  the best it does without a server). The same matrix products on both sides: only
  overheads and padding differ.
- 16 concurrent clients, varied lengths: `CLIENTS` clients each send `PER_CLIENT` requests
  in turn (the next when the previous answer is complete), asking for different lengths (a
  fixed lognormal draw, median 48: what chat answers look like). Ours keeps 16 sequences
  in flight, a new one joining at the step after one leaves; transformers runs them as
  static batches of 16, each to its longest request (its clients wait for the whole batch).
  Tokens/s counts the tokens the requests asked for.
- time to first token: ours from the engine's own per-request measurement; transformers'
  as the time of the same `generate` call with `max_new_tokens=1`.
- KV: blocks held vs tokens held during the 16-request run (utilization), against what a
  cache preallocated per sequence to the context (transformers' static cache) would take.
- bfloat16, int8 and int4: weight bytes vs float32, and quality on the fixed prompt set: logit error
  against the float32 model along its own greedy continuations, top-1 agreement, greedy
  outputs equal (and tokens before the first difference), and the perplexity of the float32
  model's continuations under each. Random weights give flat next-token distributions
  (perplexity ~150 of 8192), so top-1 flips on near ties far more than a trained model's.

Time is the thread's CPU time (`time.thread_time`; with one torch thread the model computes on
this thread), best of `ROUNDS` rounds in which the two sides alternate: the machines these
run on are shared, and wall time there measures the neighbours. Prints the tables; writes
nothing.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.hf_checkpoints import CORPUS, write_checkpoint
from bench.report import machine, recorded, table
from node_agent.generation.engine import EngineConfig, GenerationEngine
from node_agent.generation.hf_checkpoint import load_hf_model
from node_agent.generation.hf_llama import LlamaForPaged
from node_agent.generation.sampling_params import SamplingParams

QUICK = os.environ.get("BENCH_QUICK") == "1"
MODEL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
)  # fmt: skip
CONCURRENT = 4 if QUICK else 16
PER_CLIENT = 2 if QUICK else 3
OUTPUT_TOKENS = 8 if QUICK else 64
VARIED_MEDIAN, VARIED_SIGMA, VARIED_MAX = (8, 0.8, 32) if QUICK else (48, 0.8, 256)
ROUNDS = 1 if QUICK else 3
BLOCK = 16
KV_BLOCKS = 256
"""KV pool of the engine: 256 blocks of 16 tokens (4096 token slots, 8 contexts of 512)."""


def prompts(tok: Any, n: int) -> list[list[int]]:
    """n prompts of varied real token lengths (one to four corpus sentences each)."""
    out = []
    for i in range(n):  # "request i:" first: no two prompts share a KV block
        text = f"request {i}: " + " ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(1 + i % 4))
        out.append(tok.encode(text))
    return out


def varied_lengths(n: int) -> list[int]:
    """Output lengths of n requests: lognormal around VARIED_MEDIAN, fixed seed."""
    gen = torch.Generator().manual_seed(5)
    draws = torch.exp(torch.randn(n, generator=gen) * VARIED_SIGMA) * VARIED_MEDIAN
    return [int(min(max(4, round(x)), VARIED_MAX)) for x in draws.tolist()]


def best_of(*fns: Callable[[], Any]) -> list[tuple[float, Any]]:
    """(best CPU seconds, last result) of each function, over ROUNDS rounds that alternate them."""
    best = [float("inf")] * len(fns)
    results: list[Any] = [None] * len(fns)
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            t0 = time.thread_time()
            results[i] = fn()
            best[i] = min(best[i], time.thread_time() - t0)
    return list(zip(best, results, strict=True))


@dataclass
class EngineRun:
    tokens: list[list[int]]
    """Output tokens of each request, in request order."""
    mean_ttft_s: float
    kv_utilization: float
    """Mean over steps of tokens held / slots of the blocks held."""
    peak_blocks: int
    peak_tokens: int


def run_ours(model: LlamaForPaged, batch: list[list[int]], lengths: list[int] | None = None,
             in_flight: int | None = None) -> EngineRun:  # fmt: skip
    """Greedy outputs of every request (EOS ignored), `in_flight` at most at once (default
    all): a request joins as soon as one leaves, as a closed loop of `in_flight` clients."""
    engine = GenerationEngine(model, EngineConfig(KV_BLOCKS, block_size=BLOCK, max_num_seqs=64),
                              clock=time.thread_time)  # fmt: skip
    lengths = lengths or [OUTPUT_TOKENS] * len(batch)
    in_flight = in_flight or len(batch)
    todo = list(range(len(batch)))[::-1]
    seq_of: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in batch]
    util: list[float] = []
    peak_blocks = peak_tokens = 0

    def submit() -> None:
        i = todo.pop()
        seq_of[
            engine.add(batch[i], SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True))
        ] = i

    for _ in range(min(in_flight, len(batch))):
        submit()
    while engine.has_work():
        for o in engine.step():
            if o.token_id is not None:
                out[seq_of[o.seq_id]].append(o.token_id)
            if o.finish_reason is not None and todo:
                submit()
        held = sum(engine.kv.num_tokens(s.seq_id) for s in engine.running)
        used = engine.kv.num_blocks - engine.kv.num_free_blocks
        if engine.running:
            util.append(held / (used * BLOCK))
            peak_blocks, peak_tokens = max(peak_blocks, used), max(peak_tokens, held)
    return EngineRun(out, engine.stats().mean_ttft_s, sum(util) / max(len(util), 1), peak_blocks, peak_tokens)


def run_hf(
    hf: Any, batch: list[list[int]], max_new: int | list[int], pad_id: int, size: int = 0
) -> list[list[int]]:
    """transformers' generate on the batch, left-padded, in static batches of `size` (default
    all), each run to its longest request; every output cut to its own length."""
    size = size or len(batch)
    lengths = max_new if isinstance(max_new, list) else [max_new] * len(batch)
    outputs: list[list[int]] = []
    for start in range(0, len(batch), size):
        part, want = batch[start : start + size], lengths[start : start + size]
        width = max(len(p) for p in part)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=max(want), do_sample=False,
                              pad_token_id=pad_id)  # fmt: skip
        outputs += [[int(t) for t in row[width : width + n]] for row, n in zip(out, want, strict=True)]
    return outputs


def quality(
    fp: LlamaForPaged, q: LlamaForPaged, batch: list[list[int]], continuations: list[list[int]]
) -> list[object]:
    """int8 vs float32 along the float32 model's own greedy continuations."""
    err = rel = agree = n = 0.0
    nll_fp = nll_q = 0.0
    for p, c in zip(batch, continuations, strict=True):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            a, b = fp(ids)[0, len(p) - 1 : -1], q(ids)[0, len(p) - 1 : -1]
        target = torch.tensor(c)
        err = max(err, (a - b).abs().max().item())
        rel += ((a - b).abs().mean() / a.abs().mean()).item()
        agree += (a.argmax(-1) == b.argmax(-1)).float().sum().item()
        nll_fp += torch.nn.functional.cross_entropy(a, target, reduction="sum").item()
        nll_q += torch.nn.functional.cross_entropy(b, target, reduction="sum").item()
        n += len(c)
    return [err, rel / len(batch), agree / n, float(torch.exp(torch.tensor(nll_fp / n))),
            float(torch.exp(torch.tensor(nll_q / n)))]  # fmt: skip


def equal(ours: list[list[int]], theirs: list[list[int]]) -> str:
    return f"{sum(a == b for a, b in zip(ours, theirs, strict=True))}/{len(ours)}"


def speed(
    hf: Any, fp: LlamaForPaged, q8: LlamaForPaged, tok: Any
) -> tuple[list[list[object]], EngineRun, EngineRun]:
    """The speed table's rows; the equal-length runs of float32 and int8 (for KV and quality)."""
    pad = tok.token_id("<unk>") or 0
    batch = prompts(tok, CONCURRENT)
    singles = batch[:4]
    (t1, ours1), (t1_hf, hf1), (ttft1_hf, _) = best_of(
        lambda: [run_ours(fp, [p]) for p in singles],
        lambda: [run_hf(hf, [p], OUTPUT_TOKENS, pad)[0] for p in singles],
        lambda: [run_hf(hf, [p], 1, pad) for p in singles],
    )
    n1 = len(singles) * OUTPUT_TOKENS
    ttft1 = sum(r.mean_ttft_s for r in ours1) / len(ours1)
    (t16, ours16), (t16_hf, hf16), (ttft16_hf, _), (t16_q, q16) = best_of(
        lambda: run_ours(fp, batch), lambda: run_hf(hf, batch, OUTPUT_TOKENS, pad),
        lambda: run_hf(hf, batch, 1, pad), lambda: run_ours(q8, batch),
    )  # fmt: skip
    n16 = len(batch) * OUTPUT_TOKENS
    many = prompts(tok, CONCURRENT * PER_CLIENT)
    lengths = varied_lengths(len(many))
    (tv, oursv), (tv_hf, hfv), (tv_q, qv) = best_of(
        lambda: run_ours(fp, many, lengths, CONCURRENT),
        lambda: run_hf(hf, many, lengths, pad, CONCURRENT),
        lambda: run_ours(q8, many, lengths, CONCURRENT),
    )
    nv = sum(lengths)
    c, v = f"{CONCURRENT} concurrent, {OUTPUT_TOKENS} tokens each", (
        f"{CONCURRENT} clients x {PER_CLIENT}, {min(lengths)}-{max(lengths)} tokens each")  # fmt: skip
    rows: list[list[object]] = [
        ["batch 1", "ours (paged engine)", n1 / t1, ttft1 * 1e3, equal([r.tokens[0] for r in ours1], hf1)],
        ["batch 1", "transformers generate", n1 / t1_hf, ttft1_hf / len(singles) * 1e3, "-"],
        ["", "ours / transformers", t1_hf / t1, "", ""],
        [c, "ours (paged engine)", n16 / t16, ours16.mean_ttft_s * 1e3, equal(ours16.tokens, hf16)],
        [c, "transformers generate (padded batch)", n16 / t16_hf, ttft16_hf * 1e3, "-"],
        [c, "ours, int8 weights", n16 / t16_q, q16.mean_ttft_s * 1e3, "-"],
        ["", "ours / transformers", t16_hf / t16, "", ""],
        [v, "ours (paged engine)", nv / tv, oursv.mean_ttft_s * 1e3, equal(oursv.tokens, hfv)],
        [v, "transformers generate (static batches)", nv / tv_hf, ttft16_hf * 1e3, "-"],
        [v, "ours, int8 weights", nv / tv_q, qv.mean_ttft_s * 1e3, "-"],
        ["", "ours / transformers", tv_hf / tv, "", ""],
    ]
    return rows, ours16, q16


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        hf = write_checkpoint(directory, "llama", seed=11, tie_word_embeddings=False, **MODEL)
        hf.generation_config.eos_token_id = None  # equal work: every request makes its tokens
        fp, tok = load_hf_model(directory)
        q8, _ = load_hf_model(directory, quantization="int8")
        q4, _ = load_hf_model(directory, quantization="int4")
        bf, _ = load_hf_model(directory, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in hf.parameters())
    rows, run16, runq = speed(hf, fp, q8, tok)
    print(f"Llama checkpoint, {n_params / 1e6:.1f} M parameters; {machine()}; CPU time, one torch thread,"
          f" best of {ROUNDS} alternating rounds")  # fmt: skip
    print(table(["load", "engine", "tokens/s", "TTFT ms", "tokens equal transformers'"], rows))
    batch = prompts(tok, CONCURRENT)
    ctx = fp.config.max_seq_len
    print("\n" + table(
        [f"KV during the {CONCURRENT}-request run", "value"],
        [["mean utilization (tokens held / slots of blocks held)", run16.kv_utilization],
         [f"peak tokens held / peak slots held (blocks of {BLOCK})",
          f"{run16.peak_tokens} / {run16.peak_blocks * BLOCK}"],
         [f"slots a cache preallocated per sequence holds ({len(batch)} x {ctx})", len(batch) * ctx],
         ["prompt tokens (real tokenizer), min/max", f"{min(map(len, batch))}/{max(map(len, batch))}"]],
    ))  # fmt: skip
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    print("\n" + table(
        ["weights", "bytes", "vs float32"],
        [["transformers float32", hf_bytes, 1.0],
         ["ours float32", fp.weight_bytes(), fp.weight_bytes() / hf_bytes],
         ["ours bfloat16", bf.weight_bytes(), bf.weight_bytes() / hf_bytes],
         ["ours int8 (per-channel scales)", q8.weight_bytes(), q8.weight_bytes() / hf_bytes],
         ["ours int4 (group-64 scales; embedding int8)", q4.weight_bytes(), q4.weight_bytes() / hf_bytes]],
    ))  # fmt: skip
    cont = run16.tokens
    rows = []
    for name, model, run in (("bfloat16", bf, run_ours(bf, batch)), ("int8", q8, runq),
                             ("int4", q4, run_ours(q4, batch))):  # fmt: skip
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                      for a, b in zip(run.tokens, cont, strict=True)]  # fmt: skip
        rows.append([name, *quality(fp, model, batch, cont), equal(run.tokens, cont),
                     f"{sum(first_diff) / len(first_diff):.1f} of {OUTPUT_TOKENS}"])  # fmt: skip
    print("\n" + table(
        ["vs float32, along its greedy continuations", "max abs logit err", "mean rel err", "top-1 agree",
         "ppl float32", "ppl quantized", "greedy outputs equal", "tokens before a difference"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    with recorded(
        "llm_engine",
        "Hugging Face Llama checkpoint: our paged engine against transformers' generate (issue 19)",
        "Goal: at least 2x transformers' tokens/s at 16 concurrent requests, equal tokens.",
    ):
        main()
