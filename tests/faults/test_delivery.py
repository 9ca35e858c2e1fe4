"""Delivery faults against real agent processes (EdgeNode mode, API server out of reach, real
TorchScript models) and a loopback origin this test controls (`bench.origin`).

Invariants asserted: no node serves bytes that do not hash to the spec's digest (a corrupt
peer is refused, and the node still serves the right model); a transfer cut at 50% resumes,
so the origin sends the artifact once; a second node of the site fetches from the first, so
the site's uplink carries one copy; every inference answer is the model's own output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.origin import Origin
from node_agent.examples import make_examples
from node_agent.link.download import ARTIFACT_ROUTE
from node_agent.runtime.repository import sha256_file
from tests.faults.delivery_support import AgentProcess, big_model, offline_args

FEATURES = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
BODY = json.dumps(
    {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": FEATURES.ravel().tolist()}
        ]
    }
).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    examples = tmp_path_factory.mktemp("examples") / "models"
    make_examples(examples)
    root = tmp_path_factory.mktemp("served")
    digest, config = big_model(examples, root)
    return root, digest, config


@pytest.fixture
def origin(served: tuple[Path, str, str]) -> Iterator[Origin]:
    root = served[0]
    server = Origin({f"big/1/{f}": (root / "big" / "1" / f).read_bytes() for f in ("model.pt", "model.yaml")})
    yield server
    server.close()


def expected(root: Path) -> np.ndarray:
    with torch.inference_mode():
        return (
            torch.jit.load(str(root / "big" / "1" / "model.pt"))(torch.from_numpy(FEATURES)).numpy().ravel()
        )


def test_a_site_pays_one_copy_resumes_a_cut_and_refuses_a_corrupt_peer(
    served: tuple[Path, str, str], origin: Origin, tmp_path: Path
) -> None:
    root, digest, config = served
    size = (root / "big" / "1" / "model.pt").stat().st_size
    want = expected(root)
    origin.cuts, origin.cut_only = [size // 2], "big/1/model.pt"  # the uplink drops halfway through
    bad = Origin(
        {ARTIFACT_ROUTE.lstrip("/") + digest.removeprefix("sha256:"): (root / "big/1/model.pt").read_bytes()}
    )
    bad.corrupt = True
    first = AgentProcess(offline_args(tmp_path / "a", origin.base, digest, config, []), tmp_path / "a.log")
    second = None
    try:
        first.wait_ready(60)
        status, doc = first.infer(BODY)
        assert status == 200, doc
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]), want, atol=1e-5)
        pt = [(r, s) for p, r, s in origin.log.requests if p.endswith("model.pt")]
        assert pt == [(None, 200), (f"bytes={size // 2}-", 206)], pt  # resumed, not restarted
        assert origin.log.sent_by_path["big/1/model.pt"] == size  # nothing re-fetched

        # The first agent serves its verified copy to peers, by digest, with Range.
        status, data = first.get(ARTIFACT_ROUTE + digest.removeprefix("sha256:"))
        assert status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert first.get(ARTIFACT_ROUTE + "0" * 64)[0] == 404

        # A second node of the site: a corrupt peer first, then the first agent.
        peers = [bad.base, first.base]
        second = AgentProcess(
            offline_args(tmp_path / "b", origin.base, digest, config, peers), tmp_path / "b.log"
        )
        second.wait_ready(60)
        status, doc = second.infer(BODY)
        assert status == 200, doc
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]), want, atol=1e-5)
        assert sha256_file(tmp_path / "b" / "models" / "big" / "1" / "model.pt") == digest
        assert len(bad.log.requests) == 1  # tried, its bytes refused
        assert "do not verify" in second.tail()
        assert origin.log.sent_by_path["big/1/model.pt"] == size, "the site's uplink carried one copy"
    finally:
        if second is not None:
            second.stop()
        first.stop()
        bad.close()
