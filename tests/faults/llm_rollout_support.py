"""Helpers of tests/faults/test_llm_rollout.py: two versions of the example TinyLM (different
weights, so their greedy tokens tell which answered), the InferenceService that serves one, and
clients that keep token streams open (`generate_stream`) and record each stream's one outcome.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_api import names

MODEL = "tiny-lm"
GENERATION = {"maxTokens": 256, "maxSequences": 16, "kvBlockTokens": 16}


def write_versions(root: Path) -> dict[str, tuple[str, str]]:
    """tiny-lm/1 (the example, seed 7) and tiny-lm/2 (seed 8) under `root`; version ->
    (artifact digest, model.yaml digest)."""
    from node_agent.generation.transformer import (
        TINY_LM_EXAMPLE,
        TinyLM,
        save_tiny_lm,
        write_tiny_lm,
    )
    from node_agent.runtime.model_yaml import write_model_config
    from node_agent.runtime.repository import sha256_file

    write_tiny_lm(root, MODEL, "1")
    config = write_tiny_lm(root, MODEL, "2")
    version_dir = root / MODEL / "2"
    save_tiny_lm(TinyLM.random(TINY_LM_EXAMPLE, 8), version_dir / config.artifact)
    config = dataclasses.replace(
        config,
        digest=sha256_file(version_dir / config.artifact),
        parameters={**config.parameters, "seed": "8"},
    )
    write_model_config(version_dir, config)
    out = {}
    for version in ("1", "2"):
        d = root / MODEL / version
        out[version] = (sha256_file(d / config.artifact), sha256_file(d / "model.yaml"))
    return out


def model_entry(version: str, uri: str, digest: str, config_digest: str) -> dict[str, Any]:
    return {
        "name": MODEL,
        "version": version,
        "task": "generate",
        "format": "tinylm-npz",
        "memoryEstimate": "64Mi",
        "artifact": {"uri": uri, "digest": digest, "configDigest": config_digest},
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 259]}],
        "generation": GENERATION,
    }


def llm_service(name: str, group_id: str, entry: dict[str, Any], rollout: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name},
        "spec": {
            "models": [entry],
            "sla": {"p95LatencyMs": 5000, "p99LatencyMs": 10000},
            "placement": {"nodeSelector": {"test-group": group_id}},
            "rollout": rollout,
        },
    }


def generate(port: int, prompt: str, max_tokens: int, version: str | None = None) -> dict[str, Any]:
    """One greedy `generate` (whole answer): its JSON (model_version, token_ids, ...)."""
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/generate"
    body = {
        "text_input": prompt,
        "parameters": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


@dataclass
class Stream:
    """One `generate_stream` request and its one outcome."""

    started: float
    ended: float = 0.0
    status: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    """An error event, a refusal's body, or the connection's failure."""


def read_stream(
    port: int, prompt: str, max_tokens: int, version: str | None = None, first: threading.Event | None = None
) -> Stream:
    """One greedy `generate_stream` request (of `version`, or the node's traffic split's choice)
    read to its end; `first` is set once its first token arrived."""
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/generate_stream"
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body = json.dumps({"text_input": prompt, "parameters": params}).encode()
    s = Stream(time.monotonic())
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            s.status = r.status
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    s.error = str(event["error"])
                    break
                s.tokens.append(int(event["token_id"]))
                s.finish_reason = event.get("finish_reason", s.finish_reason)
                if first is not None:
                    first.set()
    except urllib.error.HTTPError as e:
        s.status, s.error = e.code, e.read().decode(errors="replace")[:300]
    except OSError as e:
        s.error = f"{type(e).__name__}: {e}"
    s.ended = time.monotonic()
    return s


class PinnedStreams:
    """`count` streams of one version, opened at once, each in its own thread."""

    def __init__(self, port: int, prompt: str, max_tokens: int, version: str, count: int) -> None:
        self.first = [threading.Event() for _ in range(count)]
        self.streams: list[Stream] = []
        self._threads = [
            threading.Thread(
                target=lambda e=e: self.streams.append(read_stream(port, prompt, max_tokens, version, e)),
                daemon=True,
            )
            for e in self.first
        ]
        for t in self._threads:
            t.start()

    def wait_first_tokens(self, timeout_s: float = 60) -> None:
        for e in self.first:
            assert e.wait(timeout_s), "a pinned stream got no first token"

    def join(self, timeout_s: float = 60) -> list[Stream]:
        for t in self._threads:
            t.join(timeout_s)
        return list(self.streams)


class StreamClients:
    """`clients` threads, each sending greedy `generate_stream` requests for the model (no
    version: the node's traffic split picks) one after another, `max_tokens` tokens each."""

    def __init__(self, port: int, prompt: str, max_tokens: int, clients: int = 3) -> None:
        self.port, self.prompt, self.max_tokens = port, prompt, max_tokens
        self.streams: list[Stream] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            s = read_stream(self.port, self.prompt, self.max_tokens)
            with self._lock:
                self.streams.append(s)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> list[Stream]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        with self._lock:
            return list(self.streams)
