"""LLM decode against llama.cpp: the same Llama checkpoint in our paged engine and in
llama-cpp-python, greedy, same prompts, same output lengths (issue 21, item 2).

    python -m bench.vs_llamacpp                # full run (installs llama-cpp-python first: minutes)
    BENCH_QUICK=1 python -m bench.vs_llamacpp  # a smoke test on a smaller model; writes nothing

The checkpoint: a Llama (hidden 512, 8 layers, 8 heads over 4 KV heads, SwiGLU 1408,
vocabulary 8192, untied head: 32 M parameters) with random weights at a fixed seed, written
by `bench.hf_checkpoints` (transformers) with its byte-level BPE tokenizer. llama.cpp gets
it converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python
sdist, with its `gguf-py`, the `gguf` package of the same version) at `f32` (our engine
computes in float32) and at `q8_0` (8-bit weights, blocks of 32 with a scale each; ours:
`int8`, per output channel). The converter knows pre-tokenizers by a hash of a known
tokenizer's output; ours is new to it, so it is told the pre-tokenizer is `gpt-2` (ours
is the byte-level pre-tokenizer with GPT-2's split rule, which that names). Prompts go in as
token ids on both sides, so the tokenizers only have to load.

- llama-cpp-python (pinned `LLAMA_CPP_PYTHON`, built from its sdist by pip, CPU only, in
  its own venv under the user's cache directory) runs in a subprocess
  (`bench/llamacpp_worker.py`) through its Python API: `Llama.generate` (greedy), the call
  its OpenAI server makes for a request. Its server serves one request at a time (one
  model, one lock), so at 16 concurrent streams it runs them one after another
  ("llama-cpp-python, serial"). llama.cpp's own C++ server batches parallel slots; that is
  measured too, through the same library's batch API (`llama_batch`, one sequence id per
  stream, every stream in each `llama_decode`: "llama.cpp batch API").
- Ours: the paged engine (`GenerationEngine`) called directly, in this process; the
  serving layer around it (the OpenAI API) is not timed.
- One thread each side (torch threads; llama.cpp n_threads), on a 2-core machine shared
  with other work: CPU seconds of the computing process are the primary measure (wall
  also listed); the sides alternate case by case, best of `ROUNDS` rounds (1: on a
  2-core machine a round takes minutes; raise it where time allows).
- 1 stream: `SINGLES` requests one at a time. 16 streams: 16 requests at once. Every
  request makes exactly `OUTPUT_TOKENS` tokens (EOS ignored). Time to first token: from the
  request's start at 1 stream, from the run's start at 16 (a serial server's queueing is
  in it); CPU and wall.
- Tokens: our greedy outputs compared with llama.cpp's (float32 on both sides, but sums
  in a different order: on random weights, whose next-token distributions are nearly flat,
  a near tie may flip, and the rest of that sequence differs).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from bench.hf_checkpoints import write_checkpoint
from bench.llm_engine import prompts
from bench.report import machine, recorded, table
from node_agent.generation.engine import EngineConfig, GenerationEngine
from node_agent.generation.hf_checkpoint import load_hf_model
from node_agent.generation.hf_llama import LlamaForPaged
from node_agent.generation.sampling_params import SamplingParams

QUICK = os.environ.get("BENCH_QUICK") == "1"
LLAMA_CPP_PYTHON = "0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF"
"""A CPU build for this machine's instruction set (what a user building on the edge node
gets), no BLAS (llama.cpp's own kernels)."""
VENV = Path(
    os.environ.get("EDGEFLEET_LLAMACPP_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet" / "bench-llamacpp-venv"
)
MODEL = (
    dict(vocab_size=8192, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, max_position_embeddings=512)
    if QUICK else
    dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
         num_key_value_heads=4, max_position_embeddings=512)
)  # fmt: skip
STREAMS = 4 if QUICK else 16
SINGLES = 2 if QUICK else 4
OUTPUT_TOKENS = 8 if QUICK else 64
ROUNDS = 1
N_CTX_SEQ = 512
BLOCK = 16
THREADS = 1


# --- llama-cpp-python: install and convert --------------------------------------------------


def ensure_llamacpp() -> tuple[Path, Path]:
    """(the venv's python, the unpacked converter folder), installing on first use: the sdist
    is downloaded once, its converter unpacked, and pip builds the same file."""
    python = VENV / "bin" / "python"
    src = VENV / "llama.cpp-convert"
    marker = VENV / ".edgefleet-ready"
    recipe = f"llama-cpp-python=={LLAMA_CPP_PYTHON} CMAKE_ARGS={CMAKE_ARGS}"
    if marker.exists() and marker.read_text().strip() == recipe and (src / "convert_hf_to_gguf.py").exists():
        return python, src
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} into {VENV} (first run only; ~10 min on 2 cores)",
          flush=True)  # fmt: skip
    VENV.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=300)
    sdist_dir = VENV / "sdist"
    have = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True, cwd=VENV)  # fmt: skip
    built = have.returncode == 0 and have.stdout.strip() == LLAMA_CPP_PYTHON
    subprocess.run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(sdist_dir), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                   check=True, timeout=1200)  # fmt: skip
    (sdist,) = sdist_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    if not built:  # (else built before from the same pin: only the converter was missing)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(sdist)], check=True, env=env,
                       timeout=3600)  # fmt: skip
    unpack_converter(sdist, src)
    marker.write_text(recipe + "\n")
    return python, src


def unpack_converter(sdist: Path, dest: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py, its conversion package and gguf-py, from the sdist."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers()
            if m.name.startswith(prefix)
            and (m.name[len(prefix):] == "convert_hf_to_gguf.py"
                 or m.name[len(prefix):].startswith(("conversion/", "gguf-py/")))
        ]  # fmt: skip
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(dest, members=members, filter="data")


CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
# our tokenizer is new to the converter's hash table; its pre-tokenizer is GPT-2's byte-level split
base = conversion.base.TextModel
base.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# without a tokenizer.model the converter falls back to tokenizer.json, as it does when
# sentencepiece (not a project dependency) is installed: the file is looked for first
sentencepiece = base._create_vocab_sentencepiece
def no_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return sentencepiece(self)
base._create_vocab_sentencepiece = no_sentencepiece
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, checkpoint: Path, out: Path, outtype: str) -> None:
    """The checkpoint as GGUF (`outtype`: f32, q8_0), by llama.cpp's converter, run with the
    project's python (its torch, transformers and safetensors)."""
    args = [str(src), str(checkpoint), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run([sys.executable, "-c", CONVERT, *args], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed: {done.stderr[-2000:]}")


class LlamaCpp:
    """The worker subprocess (bench/llamacpp_worker.py) holding one GGUF model."""

    def __init__(self, python: Path, gguf: Path, streams: int) -> None:
        worker = Path(__file__).with_name("llamacpp_worker.py")
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen([str(python), str(worker)], stdin=pipe, stdout=pipe, text=True, cwd=VENV)
        self.info = self.ask(op="load", path=str(gguf), threads=THREADS, n_seq=streams, n_ctx_seq=N_CTX_SEQ)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited ({self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=60)


# --- ours -------------------------------------------------------------------------------------


def run_ours(model: LlamaForPaged, batch: list[list[int]], serial: bool) -> dict[str, Any]:
    """Greedy outputs of every request (EOS ignored): all at once, or one after another.
    One engine, made before the clock starts (as a server holds one, and as llama.cpp's
    context is made at load); no prompt shares a block with another, so each request
    starts from an empty cache, as llama.cpp's is reset between requests."""
    outs: list[list[int]] = [[] for _ in batch]
    ttft: list[float] = []
    ttft_cpu: list[float] = []
    groups = [[i] for i in range(len(batch))] if serial else [list(range(len(batch)))]
    engine = GenerationEngine(model, EngineConfig(len(batch) * N_CTX_SEQ // BLOCK, block_size=BLOCK,
                                                  max_num_seqs=64))  # fmt: skip
    t0, c0 = time.perf_counter(), time.thread_time()
    for group in groups:
        s0, sc0 = (time.perf_counter(), time.thread_time()) if serial else (t0, c0)
        seq_of = {engine.add(batch[i], SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0,
                                                      ignore_eos=True)): i for i in group}  # fmt: skip
        while engine.has_work():
            for o in engine.step():
                if o.token_id is not None:
                    out = outs[seq_of[o.seq_id]]
                    if not out:
                        ttft.append(time.perf_counter() - s0)
                        ttft_cpu.append(time.thread_time() - sc0)
                    out.append(o.token_id)
    return {
        "tokens": outs,
        "ttft_s": ttft,
        "ttft_cpu_s": ttft_cpu,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.thread_time() - c0,
    }


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """Equal sequences, and mean tokens before the first difference."""
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    before = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
              for a, b in zip(ours, theirs, strict=True)]  # fmt: skip
    return f"{equal}/{len(ours)} ({sum(before) / len(before):.0f} of {OUTPUT_TOKENS})"


def measure(model: LlamaForPaged, peer: LlamaCpp, batch: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Each case's run with the least CPU, over `ROUNDS` rounds in which the sides alternate."""
    singles = batch[:SINGLES]
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "ours 1": lambda: run_ours(model, singles, serial=True),
        "llama 1": lambda: peer.ask(op="serial", prompts=singles, max_tokens=OUTPUT_TOKENS, queued=False),
        "ours N": lambda: run_ours(model, batch, serial=False),
        "batch N": lambda: peer.ask(op="batched", prompts=batch, max_tokens=OUTPUT_TOKENS),
        "llama N": lambda: peer.ask(op="serial", prompts=batch, max_tokens=OUTPUT_TOKENS, queued=True),
    }
    best: dict[str, dict[str, Any]] = {}
    for _ in range(ROUNDS):
        for key, fn in cases.items():
            run = fn()
            if key not in best or run["cpu_s"] < best[key]["cpu_s"]:
                best[key] = run
    return best


def rows_of(precision: str, best: dict[str, dict[str, Any]]) -> list[list[object]]:
    """The table's rows of one precision: each side's tokens/s and TTFT, then ours / theirs."""
    ours = "ours, float32" if precision == "f32" else "ours, int8 (per-channel)"
    theirs = f"llama-cpp-python, {precision}"
    rows: list[list[object]] = []
    for load, cases in (
        ("1 stream", (("ours 1", ours), ("llama 1", theirs))),
        (f"{STREAMS} streams", (("ours N", ours), ("batch N", f"llama.cpp batch API, {precision}"),
                                ("llama N", f"{theirs}, serial (as its server)"))),
    ):  # fmt: skip
        ref = best[cases[0][0]]
        n_tok = sum(len(t) for t in ref["tokens"])
        for key, name in cases:
            r = best[key]
            same = "-" if r is ref else agreement(ref["tokens"], r["tokens"])
            rows.append([load, name, n_tok / r["cpu_s"], n_tok / r["wall_s"], mean(r["ttft_cpu_s"]) * 1e3,
                         mean(r["ttft_s"]) * 1e3, same])  # fmt: skip
        for key, name in cases[1:]:
            r = best[key]
            rows.append(
                ["", f"ours / {name}", r["cpu_s"] / ref["cpu_s"], r["wall_s"] / ref["wall_s"], "", "", ""]
            )
    return rows


def verdicts(precision: str, best: dict[str, dict[str, Any]]) -> list[str]:
    """One line per goal (CPU time): 16 streams ahead of llama.cpp, 1 stream within 1.5x."""
    one = best["llama 1"]["cpu_s"] / best["ours 1"]["cpu_s"]
    batched = best["batch N"]["cpu_s"] / best["ours N"]["cpu_s"]
    serial = best["llama N"]["cpu_s"] / best["ours N"]["cpu_s"]
    return [
        f"- {precision}, {STREAMS} streams, ahead of llama.cpp: against its batch API "
        f"{'met' if batched > 1 else 'not met'} (ours {batched:.2f}x its tokens/s); against "
        f"llama-cpp-python's serial server {'met' if serial > 1 else 'not met'} ({serial:.2f}x).",
        f"- {precision}, 1 stream, within 1.5x: {'met' if one >= 1 / 1.5 else 'not met'} "
        f"(ours {one:.2f}x its tokens/s; the goal is >= 0.67x).",
    ]


def where_time_goes(model: LlamaForPaged, batch: list[list[int]], tokens: int = 16) -> list[list[object]]:
    """cProfile (on the thread's CPU clock) of our engine making `tokens` tokens for each of
    `batch` at once: the functions with the most own time, per decode step."""
    prof = cProfile.Profile(time.thread_time)
    engine = GenerationEngine(model, EngineConfig(len(batch) * N_CTX_SEQ // BLOCK, block_size=BLOCK))
    for p in batch:
        engine.add(p, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    engine.step()  # the prefill: not a decode step
    steps = 0
    prof.enable()
    while engine.has_work():
        engine.step()
        steps += 1
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(own for _, _, own, _, _ in stats.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    rows: list[list[object]] = []
    for (file, line, name), (_, calls, own, _, _) in top:
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append([where, calls // steps, own / steps * 1e3, own / total])
    rows.append(["all", "", total / steps * 1e3, 1.0])
    return rows


def main() -> None:
    torch.set_num_threads(THREADS)
    python, src = ensure_llamacpp()
    rows: list[list[object]] = []
    profiles: list[tuple[int, list[list[object]]]] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llama"
        hf = write_checkpoint(ckpt, "llama", seed=11, tie_word_embeddings=False, **MODEL)
        n_params = sum(p.numel() for p in hf.parameters())
        del hf
        fp, tok = load_hf_model(ckpt)
        ours = {"f32": fp, "q8_0": load_hf_model(ckpt, quantization="int8")[0]}
        batch = prompts(tok, STREAMS)
        sizes = {}
        for precision, model in ours.items():
            gguf = Path(tmp) / f"llama-{precision}.gguf"
            convert(src, ckpt, gguf, precision)
            sizes[precision] = gguf.stat().st_size
            if precision == "f32":
                profiles = [(n, where_time_goes(model, batch[:n])) for n in (1, STREAMS)]
            peer = LlamaCpp(python, gguf, STREAMS)
            try:
                best = measure(model, peer, batch)
                rows += rows_of(precision, best)
                lines += verdicts(precision, best)
            finally:
                peer.close()
    print(
        f"Llama checkpoint, {n_params / 1e6:.1f} M parameters; {machine()}; llama-cpp-python "
        f"{LLAMA_CPP_PYTHON} (CMAKE_ARGS {CMAKE_ARGS}); one thread each side; {OUTPUT_TOKENS} tokens "
        f"per request, greedy; prompts {min(map(len, batch))}-{max(map(len, batch))} tokens; best of "
        f"{ROUNDS} round(s), the sides alternating. Weights: GGUF f32 {sizes['f32'] / 1e6:.0f} MB, q8_0 "
        f"{sizes['q8_0'] / 1e6:.0f} MB; ours float32 {fp.weight_bytes() / 1e6:.0f} MB, int8 "
        f"{ours['q8_0'].weight_bytes() / 1e6:.0f} MB.\n"
    )
    print(table(["load", "engine", "tokens/s (CPU)", "tokens/s (wall)", "TTFT ms (CPU)", "TTFT ms (wall)",
                 "greedy tokens equal ours (mean tokens before a difference)"], rows))  # fmt: skip
    print("\nGoals (CPU time):\n" + "\n".join(lines))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nLoad average (1, 5, 15 min) after the measured runs: {load} ({os.cpu_count()} cores).")
    for n, prof in profiles:
        print(f"\nWhere our decode step's CPU time goes, float32, {n} stream{'s' if n > 1 else ''} "
              "(cProfile on the thread's CPU clock; own time of the top functions):\n")  # fmt: skip
        print(table(["function", "calls per step", "ms per step", "share"], prof))


if __name__ == "__main__":
    with recorded(
        "vs_llamacpp",
        "LLM decode against llama.cpp (issue 21)",
        "Goal: ahead of llama.cpp at 16 concurrent streams, within 1.5x of it on one stream. The module "
        "docstring of `bench/vs_llamacpp.py` says how each side runs; the profile tables at the end say "
        "where our decode step's time goes.",
    ):
        main()
