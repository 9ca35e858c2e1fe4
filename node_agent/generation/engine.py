"""Continuous (iteration-level) batching of text generation over the paged KV cache.

`GenerationEngine` is synchronous and owned by one thread. Each `step()` is three phases:
1. schedule: one decode token for every running sequence (highest priority, oldest first;
   when blocks run out the block manager's victim is preempted for recompute and goes back
   to the front of the queue), then prefill for waiting sequences while the token budget,
   `max_num_seqs` and free blocks allow (a prompt longer than the budget runs alone);
2. execute: copy-on-write block copies, then one `forward_paged` pass over all of them;
3. sample: one token per sequence from its own seeded `torch.Generator`; finished
   sequences leave at once, freeing their blocks (full blocks stay in the prefix cache).
New requests join at the next step; nothing waits for a batch to drain (unless
`batching="static"`, the baseline the benchmark compares against).

Guarantees:
- Reproducible sampling: each output token consumes exactly one uniform draw from the
  sequence's generator, and a preempted sequence is recomputed from prompt + generated
  tokens, so a seeded request yields the same tokens whether or not it was preempted.
- A request that can never fit (context length or the whole KV pool) is refused when it
  is submitted (`ContextTooLong`, `SequenceTooLong`); one that fits always finishes,
  because the victim order lets the oldest, most urgent sequence run alone.

`stats()` is the snapshot the metrics module maps (time to first token, time per output
token, queue and KV counts); `async_generator.AsyncGenerator` runs the engine from asyncio.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from node_agent.errors import InvalidInput, InvalidModel, RequestTooLarge
from node_agent.generation.kv_cache import (
    KVCacheConfig,
    KVCacheManager,
    SequenceTooLong,
    block_size_for_context,
    kv_bytes_per_token,
)
from node_agent.generation.paged_attention import PagedBatch, PagedKVPool
from node_agent.generation.sampling import sample_tokens
from node_agent.generation.transformer import ByteTokenizer
from node_agent.types import MAX_SEQUENCES_PARAMETER, MAX_TOKENS_PARAMETER

if TYPE_CHECKING:
    from node_agent.generation.paged_lm import PagedLM, TextTokenizer
    from node_agent.generation.sampling_params import SamplingParams
    from node_agent.generation.transformer import TinyLMBackend

__all__ = [
    "TPOT_BUCKETS_S",
    "TTFT_BUCKETS_S",
    "ContextTooLong",
    "EngineConfig",
    "FinishReason",
    "GenerationEngine",
    "GenerationStats",
    "StepOutput",
    "engine_for_backend",
]

log = logging.getLogger(__name__)

TTFT_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the time-to-first-token histogram: a prefill on an edge device takes ms;
a queue behind a full KV cache, seconds."""
TPOT_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds of the time-per-output-token histogram: one decode step, ms to 100s of ms
(a step that recomputes a preempted sequence lands in the tail)."""


class ContextTooLong(RequestTooLarge, InvalidInput):
    """The prompt plus `max_tokens` is longer than the model's context."""


class FinishReason(enum.StrEnum):
    STOP = "stop"
    """An end-of-sequence or stop token was generated (it is part of the output ids)."""
    LENGTH = "length"
    """`max_tokens` were generated."""
    ABORT = "abort"
    ERROR = "error"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class _Seq:
    """One request's generation state. Invariant: while RUNNING, the KV cache holds the
    first `num_computed` of `prompt + output` and `num_computed == len(prompt + output) - 1`
    (the last sampled token is fed by the next decode step)."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    arrival_s: float
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    preemptions: int = 0

    def key(self) -> tuple[int, float, int]:
        """Scheduling order: most urgent, then oldest (the reverse of the victim order)."""
        return (int(self.params.priority), self.arrival_s, self.seq_id)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one step did for one sequence: a new token, and whether it finished."""

    seq_id: int
    token_id: int | None
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one model's generation engine."""

    num_blocks: int
    """KV blocks in the pool (`from_budget` sizes it from bytes)."""
    block_size: int = 16
    """Tokens per KV block. `from_budget` (and so the agent's engines) defaults to the
    model's rule instead: `kv_cache.block_size_for_context` (4 at a 512-token context), or
    the model's `parameters.kv_block_size`."""
    max_num_batched_tokens: int = 512
    """Token budget per step (decode tokens plus prefill tokens): bounds a step's latency,
    so running sequences keep a steady time per output token while prompts arrive."""
    max_num_seqs: int = 64
    """Running sequences at most (a decode batch's size)."""
    enable_prefix_caching: bool = True
    batching: str = "continuous"
    """'continuous' (join at any step) or 'static' (admit only when nothing runs: a
    baseline for benchmarks)."""
    kv_reservation: str = "paged"
    """'paged' (blocks as tokens arrive) or 'max_length' (each admitted sequence reserves
    the model's whole context, as a preallocating cache does: a baseline)."""
    max_new_tokens: int | None = None
    """The model's cap on a request's max_tokens (the service's generation.maxTokens); None: only
    the context and the KV pool bound it."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1, block_size >= 1; got {self.num_blocks}, {self.block_size}"
            )
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {self.batching!r}")
        if self.kv_reservation not in ("paged", "max_length"):
            raise ValueError(f"kv_reservation must be 'paged' or 'max_length', got {self.kv_reservation!r}")

    @classmethod
    def from_budget(
        cls, model: PagedLM, kv_budget_bytes: int, block_size: int | None = None, **kw: Any
    ) -> EngineConfig:
        """A config whose K/V pool (float32) fills `kv_budget_bytes`, in blocks of
        `block_size` tokens (default: `block_size_for_context` of the model's context)."""
        c = model.config
        if block_size is None:
            block_size = block_size_for_context(c.max_seq_len)
        per_token = kv_bytes_per_token(c.n_layers, c.n_kv_heads, c.head_dim, 4)
        return cls(kv_budget_bytes // (per_token * block_size), block_size, **kw)


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """A snapshot of the engine's counters (sums and counts are cumulative)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    preemptions: int
    steps: int
    prompt_tokens: int
    generation_tokens: int
    requests_finished: int
    ttft_s_sum: float
    ttft_count: int
    tpot_s_sum: float
    tpot_count: int
    ttft_bucket_counts: tuple[int, ...] = ()
    """Observations per bucket of `ttft_buckets_s` (not cumulative), then those above the last."""
    tpot_bucket_counts: tuple[int, ...] = ()
    """Observations per bucket of `tpot_buckets_s` (not cumulative), then those above the last."""
    ttft_buckets_s: tuple[float, ...] = TTFT_BUCKETS_S
    tpot_buckets_s: tuple[float, ...] = TPOT_BUCKETS_S

    @property
    def mean_ttft_s(self) -> float:
        return self.ttft_s_sum / self.ttft_count if self.ttft_count else 0.0

    @property
    def mean_tpot_s(self) -> float:
        return self.tpot_s_sum / self.tpot_count if self.tpot_count else 0.0


@dataclass(slots=True)
class _Scheduled:
    seq: _Seq
    tokens: list[int]
    """Tokens computed this step (the uncached rest of a prefill, or one decode token)."""
    context_len: int
    """Tokens in the cache after this step."""


class GenerationEngine:
    """Continuous batching over a `PagedLM` and a paged KV cache; see the module docstring.
    `tokenizer` (default: bytes, the TinyLM's) is carried for the text API; the engine
    itself works on token ids. Not thread-safe: one thread calls `add`, `abort` and `step`."""

    def __init__(
        self,
        model: PagedLM,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        device: str | torch.device = "cpu",
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.tokenizer: TextTokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self._eos = frozenset(model.eos_token_ids)
        self.clock = clock
        self.kv = KVCacheManager(KVCacheConfig(config.num_blocks, config.block_size,
                                               config.enable_prefix_caching))  # fmt: skip
        self.pool = PagedKVPool(model.config, config.num_blocks, config.block_size, device)
        self._seqs: dict[int, _Seq] = {}
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._ids = itertools.count()
        self._reserve_blocks = self.kv.blocks_needed(model.config.max_seq_len)
        if config.kv_reservation == "max_length" and self._reserve_blocks > config.num_blocks:
            raise ValueError(f"max_length reservation needs {self._reserve_blocks} blocks per sequence; "
                             f"the pool holds {config.num_blocks}")  # fmt: skip
        self.preemptions = 0
        self.steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.computed_tokens = 0
        """Tokens run through the model (prefill, decode and the recompute of preempted
        sequences; prefix-cache hits excluded)."""
        self.requests_finished = 0
        self.ttft_s_sum = 0.0
        self.ttft_count = 0
        self.tpot_s_sum = 0.0
        self.tpot_count = 0
        self._ttft_counts = [0] * (len(TTFT_BUCKETS_S) + 1)
        self._tpot_counts = [0] * (len(TPOT_BUCKETS_S) + 1)

    # -- requests ----------------------------------------------------------------------

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise if the request can never run: `InvalidInput` for a bad prompt,
        `ContextTooLong` past the model's context, `SequenceTooLong` past the KV pool."""
        vocab, ctx = self.model.config.vocab_size, self.model.config.max_seq_len
        if not prompt:
            raise InvalidInput("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidInput(f"prompt token ids must be in [0, {vocab})")
        cap = self.config.max_new_tokens
        if cap is not None and params.max_tokens > cap:
            raise InvalidInput(f"max_tokens {params.max_tokens} is above this model's limit of {cap}")
        total = len(prompt) + params.max_tokens
        if total > ctx:
            raise ContextTooLong(f"{len(prompt)} prompt + {params.max_tokens} max_tokens = {total} tokens; "
                                 f"the model's context is {ctx}")  # fmt: skip
        need = self.kv.blocks_needed(total)
        if need > self.kv.num_blocks:
            raise SequenceTooLong(
                f"{len(prompt)} prompt + {params.max_tokens} max_tokens need {need} KV "
                f"blocks of {self.kv.block_size} tokens; the cache holds {self.kv.num_blocks}"
            )

    def add(self, prompt: Sequence[int], params: SamplingParams, *, arrival_s: float | None = None) -> int:
        """Queue a request (checked by `check_request`); it joins at the next step. Returns its id."""
        self.check_request(prompt, params)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = _Seq(next(self._ids), list(prompt), params, self.clock() if arrival_s is None else arrival_s,
                   torch.Generator().manual_seed(seed))  # fmt: skip
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> bool:
        """Drop a request wherever it is; False if it is unknown or already finished."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        if seq.status is SeqStatus.RUNNING:
            self.kv.free(seq_id)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        del self._seqs[seq_id]
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def output_ids(self, seq_id: int) -> list[int]:
        return list(self._seqs[seq_id].output)

    # -- the step ----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Schedule, execute, sample; returns one output per sequence that ran."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        self.steps += 1
        self.computed_tokens += sum(len(s.tokens) for s in scheduled)
        try:
            logits = self._execute(scheduled)
        except Exception as e:  # the model failed: every sequence of the step fails
            log.exception("generation step failed")
            return self._fail(scheduled, e)
        return self._sample(scheduled, logits)

    def _schedule(self) -> list[_Scheduled]:
        self.running.sort(key=_Seq.key)
        out = self._schedule_decodes()
        budget = self.config.max_num_batched_tokens - len(out)
        if self.config.batching == "continuous" or not self.running:
            out += self._admit(budget, first=not out)
        return out

    def _schedule_decodes(self) -> list[_Scheduled]:
        """One token for each running sequence, preempting (the block manager's victim
        order) when blocks run out. Sequences are visited most urgent first, so the victim
        is usually the one being visited or a later one; one already scheduled (a tie of
        arrival times broken differently) is taken out of the step again."""
        out: list[_Scheduled] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted while an earlier sequence made room
            last = seq.output[-1]
            while True:
                r = self.kv.append_slots(seq.seq_id, [last])
                if r is not None:
                    self.pool.copy_blocks(r.copies)
                    out.append(_Scheduled(seq, [last], seq.num_computed + 1))
                    break
                victim_id = self.kv.choose_preemption_victim(s.seq_id for s in self.running)
                assert victim_id is not None
                victim = self._seqs[cast(int, victim_id)]
                self._preempt(victim)
                out = [x for x in out if x.seq is not victim]
                if victim is seq:
                    break
        return out

    def _preempt(self, seq: _Seq) -> None:
        p = self.kv.preempt(seq.seq_id)
        assert not p.swapped, "the engine configures no host blocks"
        self.running.remove(seq)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("generation: preempted %d after %d tokens", seq.seq_id, len(seq.output))

    def _admit(self, budget: int, *, first: bool) -> list[_Scheduled]:
        """Prefill waiting sequences, FIFO (preempted ones first), while they fit."""
        out: list[_Scheduled] = []
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.prompt + seq.output
            if len(tokens) > budget and not (first and not out):
                break  # an oversized prompt runs only as a step's first work
            if cfg.kv_reservation == "max_length" and (
                (len(self.running) + 1) * self._reserve_blocks > cfg.num_blocks
            ):
                break
            alloc = self.kv.allocate(seq.seq_id, tokens, seq.params.max_tokens - len(seq.output),
                                     priority=seq.params.priority, arrival_s=seq.arrival_s)  # fmt: skip
            if alloc is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            compute = tokens[alloc.num_cached_tokens :]
            out.append(_Scheduled(seq, compute, len(tokens)))
            budget -= len(compute)
            if not seq.output:
                self.prompt_tokens += len(seq.prompt)
        return out

    def _execute(self, scheduled: list[_Scheduled]) -> torch.Tensor:
        batch = PagedBatch.build([(s.tokens, s.context_len, self.kv.block_table(s.seq.seq_id))
                                  for s in scheduled])  # fmt: skip
        with torch.inference_mode():
            return self.model.forward_paged(batch, self.pool)

    def _sample(self, scheduled: list[_Scheduled], logits: torch.Tensor) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        now = self.clock()
        tokens = sample_tokens(
            logits, [s.seq.params for s in scheduled], [s.seq.generator for s in scheduled]
        )
        for s, token in zip(scheduled, tokens, strict=True):
            seq = s.seq
            seq.num_computed = s.context_len
            seq.output.append(token)
            self.generation_tokens += 1
            if seq.first_token_s is None:
                seq.first_token_s = now
                self.ttft_s_sum += now - seq.arrival_s
                self.ttft_count += 1
                self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS_S, now - seq.arrival_s)] += 1
            else:
                assert seq.last_token_s is not None
                self.tpot_s_sum += now - seq.last_token_s
                self.tpot_count += 1
                self._tpot_counts[bisect.bisect_left(TPOT_BUCKETS_S, now - seq.last_token_s)] += 1
            seq.last_token_s = now
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq)
            outputs.append(StepOutput(seq.seq_id, token, reason))
        return outputs

    def _finish_reason(self, seq: _Seq, token: int) -> FinishReason | None:
        p = seq.params
        if (token in self._eos and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output) >= p.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: _Seq, *, keep_cached: bool = True) -> None:
        self.kv.free(seq.seq_id, keep_cached=keep_cached)
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
        del self._seqs[seq.seq_id]
        self.requests_finished += 1

    def _fail(self, scheduled: list[_Scheduled], exc: Exception) -> list[StepOutput]:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        for s in scheduled:  # blocks indexed for this step were never written
            self._finish(s.seq, keep_cached=False)
        return [StepOutput(s.seq.seq_id, None, FinishReason.ERROR, message) for s in scheduled]

    # -- metrics -----------------------------------------------------------------------

    def stats(self) -> GenerationStats:
        free = self.kv.num_free_blocks
        return GenerationStats(
            running=len(self.running), waiting=len(self.waiting),
            kv_blocks_used=self.kv.num_blocks - free, kv_blocks_free=free,
            kv_blocks_total=self.kv.num_blocks, preemptions=self.preemptions, steps=self.steps,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            requests_finished=self.requests_finished,
            ttft_s_sum=self.ttft_s_sum, ttft_count=self.ttft_count,
            tpot_s_sum=self.tpot_s_sum, tpot_count=self.tpot_count,
            ttft_bucket_counts=tuple(self._ttft_counts), tpot_bucket_counts=tuple(self._tpot_counts),
        )  # fmt: skip

    def check_invariants(self) -> None:
        """Assert the engine's and the block manager's invariants (tests call it)."""
        self.kv.check_invariants()
        assert set(self.kv.sequences()) == {s.seq_id for s in self.running}, "KV holds other sequences"
        for seq in self.running:
            assert seq.status is SeqStatus.RUNNING
            assert seq.num_computed == len(seq.prompt) + len(seq.output) - 1, f"{seq.seq_id}: computed"
            assert self.kv.num_tokens(seq.seq_id) == seq.num_computed, f"{seq.seq_id}: KV tokens"
        assert all(s.status is SeqStatus.WAITING for s in self.waiting)
        assert len(self._seqs) == len(self.running) + len(self.waiting)


def engine_for_backend(
    backend: TinyLMBackend, *, block_size: int | None = None, **engine_settings: Any
) -> GenerationEngine:
    """An engine over a loaded `task: generate` backend (a TinyLM or a Hugging Face
    checkpoint; sharing its weights, on its device, with its tokenizer) whose KV pool fills
    the backend's `kv_cache_bytes`, which its `memory_bytes` already counts, in blocks of
    the backend's `kv_block_size` unless `block_size` is given. `InvalidInput` for a model
    that does not generate."""
    config = backend.config
    if config.task != "generate":
        raise InvalidInput(f"model {config.id} has task {config.task!r}; it does not generate text")
    model = backend.model
    if model is None:
        raise InvalidModel(f"{config.id} is unloaded")
    block_size = backend.kv_block_size if block_size is None else block_size
    for key, parameter in (
        ("max_num_seqs", MAX_SEQUENCES_PARAMETER),
        ("max_new_tokens", MAX_TOKENS_PARAMETER),
    ):
        raw = config.parameters.get(parameter)  # the service's generation settings, through the link
        if raw is not None and key not in engine_settings:
            try:
                engine_settings[key] = int(raw)
            except ValueError:
                raise InvalidModel(
                    f"{config.id}: parameters.{parameter} must be an integer, got {raw!r}"
                ) from None
    engine_config = EngineConfig.from_budget(model, backend.kv_cache_bytes, block_size, **engine_settings)
    return GenerationEngine(model, engine_config, device=model.device, tokenizer=backend.tokenizer)
