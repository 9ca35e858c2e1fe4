"""An LLM rolled out like any model, against the real local kube-apiserver: the operator's fleet
passes (in the test process), a real agent process in EdgeNode mode serving the example TinyLM
(`format: tinylm-npz`, `task: generate`, the service's `generation` settings), fetched over HTTP
and verified by digest.

The service goes from tiny-lm:1 to tiny-lm:2 through a side-by-side canary (half the node's
traffic), then is promoted by the rollout-action annotation, while clients keep greedy token
streams (`generate_stream`) open the whole time. Invariants:
- no stream is cut: every stream started gets all its tokens and its finish_reason, no error event,
  and its tokens are one version's own greedy tokens, never a mix;
- streams of tiny-lm:1 in flight at the promotion (two named by version, opened just before it)
  end whole on it, and only then does tiny-lm:1 leave the node;
- the promoted version serves: after promotion only tiny-lm:2 is on the node (tiny-lm:1 unloaded,
  its generator gone) and answers every new request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import waiting
from e2e.operator_proc import AGENT_NAMESPACE, ensure_agent_namespace
from edgefleet_api import names

from .llm_rollout_support import (
    MODEL,
    PinnedStreams,
    StreamClients,
    generate,
    llm_service,
    model_entry,
    write_versions,
)
from .rollout_safety_support import AgentProcess, ArtifactServer, Fleet, OperatorPasses, condition, running

pytestmark = pytest.mark.cluster

PROMPT = "The edge node said:"
TOKENS = 96
"""Tokens per stream of the clients that run throughout."""
PINNED_TOKENS = 240
"""Tokens per stream of tiny-lm:1 opened just before the promotion (the service caps at 256): still
running when it lands."""
LONG = {"intervalSeconds": 3600, "minSamples": 10, "failureLimit": 1}
"""A window no test waits out: only the promote annotation ends the wave."""


@pytest.fixture
def group(kube: Any, namespace: str) -> Iterator[Fleet]:
    ensure_agent_namespace(kube)
    yield Fleet(kube, namespace)


def versions_on(en: dict[str, Any], key: str) -> dict[str, str]:
    """version -> state of the service's model in the node's status."""
    return {
        m["version"]: m["state"]
        for m in (en.get("status") or {}).get("models") or []
        if m["service"] == key and m["model"] == MODEL
    }


def eventually(check: Any, what: str, timeout_s: float = 60, context: Any = None) -> Any:
    return waiting.eventually(check, timeout_s, what, None, context)


def test_an_llm_canary_is_promoted_without_cutting_a_stream(
    control_plane: Any, kube: Any, group: Fleet, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    artifacts = tmp_path / "artifacts"
    digests = write_versions(artifacts)
    server = ArtifactServer(artifacts)
    server.start()
    node = group.add_nodes(1)[0]
    repo = tmp_path / "agent-repo"
    repo.mkdir()
    agent = AgentProcess(node, control_plane.kubeconfig, AGENT_NAMESPACE, repo)
    passes = OperatorPasses(kube, group.id)
    key = f"{group.namespace}/llm"

    def entry(version: str) -> dict[str, Any]:
        digest, config = digests[version]
        return model_entry(version, server.url(f"{MODEL}/{version}/model.npz"), digest, config)

    def seen() -> str:
        en = group.edge_node(node)
        rollout = group.service("llm").get("status", {}).get("rollout")
        errors = passes.errors[-3:]
        return f"node: {en.get('status')}\nrollout: {rollout}\nerrors: {errors}\nagent:\n{agent.tail()}"

    clients = None
    try:
        with running(server, agent, passes):
            port = agent.wait_listening()
            passes.start()
            rollout = {"strategy": "Canary", "waves": [{"count": 1, "trafficWeight": 50}], "analysis": LONG}
            group.custom.create_namespaced_custom_object(
                names.GROUP, names.VERSION, group.namespace, names.INFERENCE_SERVICE_PLURAL,
                llm_service("llm", group.id, entry("1"), rollout),
            )  # fmt: skip
            eventually(
                lambda: versions_on(group.edge_node(node), key) == {"1": "Ready"},
                "tiny-lm:1 Ready on the node",
                context=seen,
            )
            first = generate(port, PROMPT, TOKENS)
            assert first["model_version"] == "1" and first["completion_tokens"] == TOKENS
            reference = {"1": first["token_ids"]}
            clients = StreamClients(port, PROMPT, TOKENS)
            clients.start()
            eventually(lambda: len(clients.streams) >= 3, "the first streams answered")

            # The canary: tiny-lm:2 beside tiny-lm:1 on the node, half its traffic.
            patch = {"spec": {"models": [entry("2")]}}
            group.custom.patch_namespaced_custom_object(
                names.GROUP, names.VERSION, group.namespace, names.INFERENCE_SERVICE_PLURAL, "llm", patch
            )
            eventually(
                lambda: versions_on(group.edge_node(node), key) == {"1": "Ready", "2": "Ready"},
                "tiny-lm:2 Ready beside tiny-lm:1",
                context=seen,
            )
            canary = generate(port, PROMPT, TOKENS, version="2")
            assert canary["model_version"] == "2"
            reference["2"] = canary["token_ids"]
            pinned_reference = generate(port, PROMPT, PINNED_TOKENS, version="1")["token_ids"]
            assert reference["1"] != reference["2"], "the versions must be told apart by their tokens"

            def answered_by(version: str) -> int:
                return sum(s.tokens == reference[version] for s in list(clients.streams))

            eventually(lambda: answered_by("1") and answered_by("2"), "streams answered by both versions")

            # Promote: tiny-lm:2 takes all the traffic, tiny-lm:1 leaves the node, while streams of
            # tiny-lm:1 (named by version, so surely on it) are running.
            pinned = PinnedStreams(port, PROMPT, PINNED_TOKENS, "1", count=2)
            pinned.wait_first_tokens()
            annotation = {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: "promote"}}}
            group.custom.patch_namespaced_custom_object(
                names.GROUP, names.VERSION, group.namespace, names.INFERENCE_SERVICE_PLURAL, "llm", annotation
            )
            promoted_at = time.monotonic()
            eventually(
                lambda: versions_on(group.edge_node(node), key) == {"2": "Ready"},
                "tiny-lm:1 unloaded from the node, tiny-lm:2 alone",
                context=seen,
            )
            gone_at = time.monotonic()
            pinned_streams = pinned.join()
            phase = eventually(
                lambda: (
                    (group.service("llm").get("status", {}).get("rollout") or {}).get("phase") == "Promoted"
                ),
                "the rollout Promoted",
                context=seen,
            )
            assert phase
            after = len(clients.streams)
            eventually(lambda: len(clients.streams) >= after + 6, "streams after tiny-lm:1 left")
            streams = clients.stop()
            last = generate(port, PROMPT, TOKENS)
            assert last["model_version"] == "2" and last["token_ids"] == reference["2"]
            ready = condition(group.service("llm"), "Ready")
            assert ready.get("status") == "True", ready
    finally:
        if clients is not None:
            clients.stop()
        group.cleanup(passes)

    cut = [
        s
        for s in streams
        if s.status != 200 or s.error or s.finish_reason != "length" or len(s.tokens) != TOKENS
    ]
    assert cut == [], f"{len(cut)} of {len(streams)} streams cut or refused, e.g. {cut[:3]}"
    mixed = [s for s in streams if s.tokens not in (reference["1"], reference["2"])]
    assert mixed == [], f"{len(mixed)} streams are no version's own tokens, e.g. {mixed[:2]}"
    assert len(pinned_streams) == 2
    for s in pinned_streams:  # in flight at the promotion, whole after it
        assert s.status == 200 and not s.error and s.finish_reason == "length", s
        assert s.tokens == pinned_reference and s.started < promoted_at < s.ended
    assert any(s.ended > promoted_at + 0.2 for s in pinned_streams), (
        "tiny-lm:1 streams ended at the promotion"
    )
    v1_across = [s for s in streams if s.tokens == reference["1"] and s.started < promoted_at < s.ended]
    late = [s for s in streams if s.started > gone_at]
    assert late and all(s.tokens == reference["2"] for s in late), "tiny-lm:1 answered after it left"
    by = {v: sum(s.tokens == reference[v] for s in streams) for v in ("1", "2")}
    print(
        f"\n{len(streams)} streams of {TOKENS} tokens, all whole; by version {by}; "
        f"{len(v1_across)} of the clients' and 2 pinned tiny-lm:1 streams in flight at the promotion "
        f"(pinned ones ended {max(s.ended for s in pinned_streams) - promoted_at:.2f} s after it); "
        f"tiny-lm:1 gone {gone_at - promoted_at:.2f} s after it; {time.monotonic() - t0:.1f} s"
    )
