"""A node that rebooted while cut off from the cloud: its agent (a real `edgefleet-agent serve`
process, as systemd or a static Pod starts it) finds only its node disk: the node cache and the
persisted assignment. The API server and the artifact's origin are closed ports.

Invariants: an agent whose node cache holds its assignment's artifacts serves them (the right
outputs, from the cache's verified bytes, hard-linked, nothing fetched); one whose cache does not
hold them never serves anything unverified (503 for the assigned model, with the reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.cold_start import FEATURES, ROOT, cold_start, infer, offline_node
from node_agent.link.node_cache import NodeCache
from node_agent.runtime.repository import sha256_file


def test_a_rebooted_node_with_no_cloud_serves_its_last_assignment_from_the_node_cache(tmp_path: Path) -> None:
    node = offline_node(tmp_path)
    assert not node.models.exists(), "the model repository starts empty: only the cache holds the model"
    result = cold_start(node, timeout_s=60)

    with torch.inference_mode():
        model = torch.jit.load(str(node.origin_model / "model.pt"))
        want = model(torch.from_numpy(FEATURES)).numpy().ravel()
    np.testing.assert_allclose(np.asarray(result.outputs, dtype=np.float32), want, atol=1e-5)
    placed = node.models / "mlp" / "1" / "model.pt"
    cache = NodeCache(node.cache)
    assert sha256_file(placed) == node.digest
    assert os.path.samefile(placed, cache.blob_path(node.digest)), "placed from the cache (a hard link)"
    assert "persisted assignment" in result.log and "from the node cache" in result.log, result.log[-3000:]
    assert not list(node.root.rglob(".*.tmp")), "no temp file left"
    print(f"cold start from the node cache: first inference after {result.first_inference_s:.2f} s")


def test_without_the_blob_in_its_cache_the_agent_serves_nothing_unverified(tmp_path: Path) -> None:
    node = offline_node(tmp_path)
    cache = NodeCache(node.cache)
    cache.blob_path(node.digest).unlink()  # the cache lost the blob (evicted, or a new disk)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}"}
    log = tmp_path / "agent.log"
    command = [sys.executable, "-m", "node_agent.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--thermal-source", "off", *node.args()]  # fmt: skip
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True)
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().rsplit(":", 1)[1].strip())
            deadline = time.monotonic() + 60
            while "fetching https://127.0.0.1" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
            status, doc = infer(port)
            assert status == 503 and "assigned" in str(doc.get("error")), doc
            assert not (node.models / "mlp" / "1" / "model.pt").exists()
        finally:
            proc.terminate()
            proc.wait(30)
