"""llama.cpp's side of bench/vs_llamacpp.py, run in its own venv (llama-cpp-python): no
project imports. Reads one JSON command per line on stdin, answers one JSON line on stdout.

    {"op": "load", "path": GGUF, "threads": 1, "n_seq": 16, "n_ctx_seq": 512}
    {"op": "serial", "prompts": [[ids...]...], "max_tokens": 64, "queued": true}
    {"op": "batched", "prompts": [[ids...]...], "max_tokens": 64}
    {"op": "quit"}

`serial`: llama-cpp-python's `Llama.generate` (greedy: temp 0), one request after another,
as its OpenAI server serves concurrent requests (one model, one lock): with `queued`, a
request's time to first token includes its wait behind the ones before it (else it is
timed from its own start: one client sending one request after another). `batched`: the same model through
llama.cpp's own batch API (`llama_batch` with one sequence id per stream, all streams in one
`llama_decode` per step, prompts prefilled together): what llama.cpp's C++ server does with
parallel slots. Both start from an empty KV cache and run every request to `max_tokens`
(EOS ignored). Times: wall (perf_counter) and this process's CPU time.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from typing import Any

import llama_cpp as L
import numpy as np


class Worker:
    def __init__(self, path: str, threads: int, n_seq: int, n_ctx_seq: int) -> None:
        L.llama_backend_init()
        self.llm = L.Llama(
            model_path=path, n_ctx=n_ctx_seq, n_batch=n_ctx_seq, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )  # fmt: skip
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mparams)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_seq * n_ctx_seq
        cparams.n_batch = n_seq * n_ctx_seq
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.capacity = n_seq * n_ctx_seq
        self.batch = L.llama_batch_init(self.capacity, 0, n_seq)

    def serial(self, prompts: list[list[int]], max_tokens: int, queued: bool) -> dict[str, Any]:
        outs: list[list[int]] = []
        ttft: list[float] = []
        ttft_cpu: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        for p in prompts:
            s0, sc0 = (t0, c0) if queued else (time.perf_counter(), time.process_time())
            self.llm.reset()  # an empty cache, as the batched side and ours start from
            out: list[int] = []
            for tok in self.llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                if not out:
                    ttft.append(time.perf_counter() - s0)
                    ttft_cpu.append(time.process_time() - sc0)
                out.append(int(tok))
                if len(out) == max_tokens:
                    break
            outs.append(out)
        return {"tokens": outs, "ttft_s": ttft, "ttft_cpu_s": ttft_cpu, "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}  # fmt: skip

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) items."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = L.llama_get_logits_ith(self.ctx, i)
        return int(
            np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax()
        )

    def batched(self, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        t0, c0 = time.perf_counter(), time.process_time()
        items: list[tuple[int, int, int, bool]] = []
        last: list[int] = []
        for s, p in enumerate(prompts):
            items += [(tok, pos, s, pos == len(p) - 1) for pos, tok in enumerate(p)]
            last.append(len(items) - 1)
        if len(items) > self.capacity:
            raise ValueError("prompts exceed the batch")
        self._decode(items)
        outs = [[self._argmax(i)] for i in last]
        ttft = [time.perf_counter() - t0] * len(prompts)
        ttft_cpu = [time.process_time() - c0] * len(prompts)
        for _ in range(max_tokens - 1):
            self._decode(
                [
                    (o[-1], len(p) + len(o) - 1, s, True)
                    for s, (p, o) in enumerate(zip(prompts, outs, strict=True))
                ]
            )
            for s, o in enumerate(outs):
                o.append(self._argmax(s))
        return {"tokens": outs, "ttft_s": ttft, "ttft_cpu_s": ttft_cpu, "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}  # fmt: skip


def main() -> None:
    worker: Worker | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            return
        if op == "load":
            worker = Worker(cmd["path"], cmd["threads"], cmd["n_seq"], cmd["n_ctx_seq"])
            reply: dict[str, Any] = {"version": L.__version__, "n_vocab": worker.n_vocab}
        elif op == "serial":
            assert worker is not None, "load first"
            reply = worker.serial(cmd["prompts"], cmd["max_tokens"], cmd["queued"])
        elif op == "batched":
            assert worker is not None, "load first"
            reply = worker.batched(cmd["prompts"], cmd["max_tokens"])
        else:
            reply = {"error": f"unknown op {op!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
