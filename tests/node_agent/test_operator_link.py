"""The agent's link to the operator against the REAL local kube-apiserver: it follows its
EdgeNode's spec (loads, unloads, traffic weights), reports status and renews its Lease,
keeps serving while the API server is out of reach (a TCP proxy the test stops), catches up
when it returns, and serves its persisted assignment after a restart without the API server.
(`materialize`, artifact URIs into the model repository, is in test_artifacts.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from agent_runner import post_infer

from edgefleet_api import names
from edgefleet_api.types import ModelId
from node_agent.errors import ModelNotFound
from node_agent.link.assigned_configs import AssignedConfigs
from node_agent.link.operator_link import OperatorLink
from node_agent.link.persistence import decode_persisted
from node_agent.link.settings import LinkSettings, api_client
from node_agent.link.watch import EdgeNodeWatch
from node_agent.runtime.engine import Engine, EngineSettings
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool

pytestmark = pytest.mark.cluster

T = TypeVar("T")
C1, C2, MLP = ModelId("classifier", "1"), ModelId("classifier", "2"), ModelId("mlp", "1")
SERVICE = "default/classify"


# --- helpers --------------------------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 that the test stops (closing every connection, so the
    port refuses) and restarts on the same port: an edge link going down and coming back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


class Cluster:
    """Admin access to the local API server, run off the event loop."""

    def __init__(self, kube: Any) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(kube)
        self.coordination = client.CoordinationV1Api(kube)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def edge_node(self, name: str) -> dict[str, Any]:
        obj: Any = await self.call(
            self.custom.get_cluster_custom_object, names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
        )
        return dict(obj)

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> int:
        obj: Any = await self.call(
            self.custom.patch_cluster_custom_object,
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            name,
            {"spec": spec},
        )
        return int(obj["metadata"]["generation"])

    async def lease(self, name: str, namespace: str) -> Any:
        return await self.call(self.coordination.read_namespaced_lease, name, namespace)


def spec_entry(model: str, version: str, digest: str, uri: str | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "service": SERVICE,
        "model": model,
        "version": version,
        "artifact": {"uri": uri or f"repo://{model}/{version}/model.pt", "digest": digest},
        **kw,
    }


async def eventually(check: Callable[[], Awaitable[T | None]], timeout_s: float = 15.0, what: str = "") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def fast_settings(edge_node: str, namespace: str, state_dir: Path) -> LinkSettings:
    return LinkSettings(
        edge_node=edge_node,
        namespace=namespace,
        state_dir=state_dir,
        endpoint="http://127.0.0.1:8000",
        watch_timeout_s=5,
        request_timeout_s=2.0,
        lease_renew_s=0.5,
        lease_duration_s=2,
        status_tick_s=0.1,
        status_min_interval_s=0.2,
        status_metrics_interval_s=0.5,
        status_max_interval_s=2.0,
        reconcile_interval_s=0.3,
        retry_failed_s=60.0,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
        startup_timeout_s=3.0,
    )


class Agent:
    """The runtime an agent composes in EdgeNode mode: repository, scheduler, stream pool,
    an engine reading configs from the link, and the link."""

    def __init__(self, repo_root: Path, settings: LinkSettings, client: Any) -> None:
        self.repo = ModelRepository(repo_root)
        self.configs = AssignedConfigs()
        loader = self.configs.loader(lambda cfg: self.repo.load(cfg, "cpu"))
        self.scheduler = ModelScheduler(1 << 30, loader)
        self.pool = StreamPool(PoolSettings(num_workers=1, torch_threads=1)).start()
        self.link = OperatorLink(settings, client, self.repo, self.scheduler, configs=self.configs)
        self.engine = Engine(self.configs, self.scheduler, self.pool, EngineSettings(latest_ttl_s=0.0))

    async def close(self) -> None:
        await self.link.stop()
        await self.engine.stop()
        await self.scheduler.close()
        self.pool.stop()


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    await agent.link.start()
    try:
        yield agent
    finally:
        await agent.close()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def reference(root: Path, model: str, version: str, x: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(root / model / version / "model.pt"))
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy())


def status_model(en: dict[str, Any], model: str, version: str) -> dict[str, Any] | None:
    for m in (en.get("status") or {}).get("models") or []:
        if (m["model"], m["version"]) == (model, version):
            return dict(m)
    return None


def ready_condition(en: dict[str, Any]) -> str | None:
    for c in (en.get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return str(c["status"])
    return None


TEST_HOLD = "edgefleet.io/test-hold"
"""A finalizer the test owns: an operator running against the same control plane (another
test session) deletes EdgeNodes of no fleet Node; with it, such a delete only marks ours."""


@pytest.fixture
def edge_node_name(kube: Any) -> Any:
    """A unique EdgeNode name; the EdgeNode (if the test made one) is deleted afterwards."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = f"link-{uuid.uuid4().hex[:8]}"
    yield name
    custom = client.CustomObjectsApi(kube)
    with suppress(ApiException):
        custom.patch_cluster_custom_object(
            names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name, {"metadata": {"finalizers": None}}
        )
        custom.delete_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name)


def create_edge_node(kube: Any, name: str, models: list[dict[str, Any]], **spec: Any) -> None:
    from kubernetes import client

    body = {
        "apiVersion": names.API_VERSION,
        "kind": names.EDGE_NODE_KIND,
        "metadata": {"name": name, "labels": {names.LABEL_NODE: name}, "finalizers": [TEST_HOLD]},
        "spec": {"nodeName": name, "models": models, **spec},
    }
    client.CustomObjectsApi(kube).create_cluster_custom_object(
        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, body
    )


def digest(root: Path, model: str, version: str) -> str:
    return parse_model_config(root / model / version / "model.yaml").digest


# --- following the spec ---------------------------------------------------------------------


def test_agent_follows_its_edge_node_spec_and_reports_status_and_lease(
    control_plane: Any, kube: Any, namespace: str, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo / "classifier", root / "classifier")  # mlp arrives by file://
    d1, d2 = digest(example_repo, "classifier", "1"), digest(example_repo, "classifier", "2")
    d_mlp = digest(example_repo, "mlp", "1")
    create_edge_node(kube, name, [spec_entry("classifier", "1", d1)], memoryBudgetBytes=512 << 20)
    cluster = Cluster(kube)
    x = images(2, seed=1)

    async def main() -> None:
        client = admin_client(control_plane.kubeconfig)
        async with running(Agent(root, fast_settings(name, namespace, tmp_path / "state"), client)) as agent:
            # 1. one model: loaded, reported Ready with its digest and measured memory
            async def c1_ready() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                m = status_model(en, "classifier", "1")
                current = en.get("status", {}).get("observedGeneration") == en["metadata"]["generation"]
                return (
                    en if m and m["state"] == "Ready" and ready_condition(en) == "True" and current else None
                )

            en = await eventually(c1_ready, what="classifier:1 Ready in status, for the current generation")
            st = en["status"]
            m = status_model(en, "classifier", "1")
            assert m is not None and m["digest"] == d1 and m["service"] == SERVICE
            measured = agent.scheduler.measured_bytes(C1)
            assert measured and m["memoryBytes"] == measured
            assert st["loadedModels"] == 1
            assert (
                st["gpu"]["name"] == "cpu" and st["gpu"]["memoryTotalBytes"] == 1 << 30
            )  # the device's budget; the spec's caps the scheduler
            assert agent.scheduler.budget_bytes == 512 << 20 and st["endpoint"] == "http://127.0.0.1:8000"
            out = await agent.engine.infer("classifier", None, {"image": x})
            np.testing.assert_allclose(
                out["logits"], reference(root, "classifier", "1", x), rtol=1e-5, atol=1e-5
            )

            # the Lease: named after the node, labelled for the operator, renewed
            lease_name = names.agent_name(name)
            lease = await cluster.lease(lease_name, namespace)
            assert lease.metadata.labels == {
                "app.kubernetes.io/name": names.AGENT_APP,
                names.LABEL_NODE: name,
            }
            assert lease.spec.lease_duration_seconds == 2 and lease.spec.holder_identity == lease_name
            first_renewal = lease.spec.renew_time

            async def renewed() -> bool:
                return bool((await cluster.lease(lease_name, namespace)).spec.renew_time > first_renewal)

            await eventually(renewed, timeout_s=5, what="a Lease renewal")

            # 2. a second version at 10% and a model from a local file: loaded, weights applied
            gen = await cluster.patch_spec(
                name,
                {
                    "models": [
                        spec_entry("classifier", "1", d1, trafficWeight=90),
                        spec_entry("classifier", "2", d2, trafficWeight=10),
                        spec_entry(
                            "mlp", "1", d_mlp, uri=f"file://{example_repo / 'mlp' / '1' / 'model.pt'}"
                        ),
                        spec_entry("classifier", "2-slow", "sha256:" + "0" * 64),
                        # s3:// is refused by the CRD now; a download without configDigest by the agent
                        spec_entry("detector", "1", d1, uri="https://models.invalid/detector/1/model.pt"),
                    ]
                },
            )

            async def all_settled() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                states = {(m["model"], m["version"]): m["state"] for m in en["status"].get("models") or []}
                want = {
                    ("classifier", "1"): "Ready",
                    ("classifier", "2"): "Ready",
                    ("mlp", "1"): "Ready",
                    ("classifier", "2-slow"): "Failed",
                    ("detector", "1"): "Failed",
                }
                return en if states == want and en["status"]["observedGeneration"] >= gen else None

            en = await eventually(all_settled, what="the new spec settled")
            assert agent.scheduler.is_resident(C2) and agent.scheduler.is_resident(MLP)
            assert agent.link.traffic.weights == {"classifier": {"1": 90, "2": 10}, "mlp": {"1": 100}}
            by = {(m["model"], m["version"]): m for m in en["status"]["models"]}
            assert by["classifier", "2"]["trafficWeight"] == 10 and by["classifier", "2"]["digest"] == d2
            assert by["mlp", "1"]["memoryBytes"] == agent.scheduler.measured_bytes(MLP)
            assert "refusing to load it" in by["classifier", "2-slow"]["message"]
            assert "gives no configDigest" in by["detector", "1"]["message"]
            assert ready_condition(en) == "False"  # two entries failed
            copied = root / "mlp" / "1" / "model.pt"
            assert copied.is_file() and sha256_file(copied) == d_mlp  # file:// copied into the repository

            ref1, ref2 = reference(root, "classifier", "1", x), reference(root, "classifier", "2", x)
            served = {"1": 0, "2": 0}
            for _ in range(50):  # requests naming no version follow the 90/10 split
                out = await agent.engine.infer("classifier", None, {"image": x})
                v = "1" if np.allclose(out["logits"], ref1, atol=1e-5) else "2"
                assert np.allclose(out["logits"], ref1 if v == "1" else ref2, atol=1e-5)
                served[v] += 1
            assert 2 <= served["2"] <= 8, served

            # 3. classifier:1 removed while a request holds it: reported Unloading, unloaded
            # once released; then gone from status and no longer served
            in_flight = await agent.scheduler.acquire(agent.configs.config("classifier", "1"))
            gen = await cluster.patch_spec(
                name,
                {
                    "models": [
                        spec_entry("classifier", "2", d2, trafficWeight=100),
                        spec_entry(
                            "mlp", "1", d_mlp, uri=f"file://{example_repo / 'mlp' / '1' / 'model.pt'}"
                        ),
                    ]
                },
            )

            async def c1_unloading() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                m = status_model(en, "classifier", "1")
                return en if m and m["state"] == "Unloading" and m["service"] == SERVICE else None

            await eventually(c1_unloading, what="classifier:1 Unloading while in flight")
            await asyncio.sleep(0.5)  # passes retry the unload, and are refused meanwhile
            assert agent.scheduler.is_resident(C1) and agent.link.traffic.weights["classifier"] == {"2": 100}
            in_flight.release()

            async def c1_gone() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                ok = (
                    en["status"]["observedGeneration"] >= gen
                    and status_model(en, "classifier", "1") is None
                    and ready_condition(en) == "True"
                )
                return en if ok and not agent.scheduler.is_resident(C1) else None

            en = await eventually(c1_gone, what="classifier:1 unloaded")
            assert en["status"]["loadedModels"] == 2
            assert agent.link.traffic.weights == {"classifier": {"2": 100}, "mlp": {"1": 100}}
            with pytest.raises(ModelNotFound):
                await agent.engine.infer("classifier", "1", {"image": x})
            out = await agent.engine.infer("classifier", None, {"image": x})
            np.testing.assert_allclose(
                out["logits"], reference(root, "classifier", "2", x), rtol=1e-5, atol=1e-5
            )

            # the assignment on disk is the latest spec
            saved = decode_persisted((tmp_path / "state" / f"assignment-{name}.json").read_text(), name)
            assert saved["metadata"]["generation"] >= gen and len(saved["spec"]["models"]) == 2
            assert agent.link.stats.status_writes < 60  # diff-based and paced, not one write per tick

    asyncio.run(asyncio.wait_for(main(), 60))


# --- the watch ----------------------------------------------------------------------------------


def test_a_restarted_watch_resumes_after_the_last_event_without_replaying(
    control_plane: Any, kube: Any, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    """`EdgeNodeWatch.restart` (the link found the API server unreachable) cuts the watch in the
    middle of its request; it resumes after the last event it delivered: no older spec is
    delivered again (an agent would apply it)."""
    name = edge_node_name
    d1 = digest(example_repo, "classifier", "1")
    create_edge_node(kube, name, [spec_entry("classifier", "1", d1)])
    cluster = Cluster(kube)
    generations: list[int] = []
    listed: list[int] = []

    async def main() -> None:
        from kubernetes import client

        loop = asyncio.get_running_loop()
        settings = fast_settings(name, "default", tmp_path / "state")
        watch = EdgeNodeWatch(
            settings,
            client.CustomObjectsApi(kube),
            time.monotonic,
            listed=lambda obj: listed.append(int((obj or {})["metadata"]["generation"])),
            event=lambda kind, obj: generations.append(int(obj["metadata"]["generation"])),
            answered=lambda: None,
            failed=lambda call, exc: None,
        )
        thread = threading.Thread(target=watch.run, args=(loop,), daemon=True)
        thread.start()
        try:
            await eventually(lambda: _truthy(listed), what="the list")
            for mib in (64, 128):
                gen = await cluster.patch_spec(
                    name, {"models": [spec_entry("classifier", "1", d1, memoryBudgetBytes=mib << 20)]}
                )
                await eventually(lambda gen=gen: _truthy(gen in generations), what=f"generation {gen}")
            watch.restart()
            await asyncio.sleep(0.5)  # the watch thread resumes
            gen = await cluster.patch_spec(name, {"models": [spec_entry("classifier", "1", d1, pinned=True)]})
            await eventually(lambda: _truthy(gen in generations), what=f"generation {gen} after the restart")
        finally:
            watch.stop()
            await asyncio.to_thread(thread.join, 10)
        assert generations == sorted(set(generations)), generations  # each once, in order
        assert listed == [1]  # resumed, not relisted

    asyncio.run(asyncio.wait_for(main(), 60))


async def _truthy(value: Any) -> Any:
    return value


# --- offline --------------------------------------------------------------------------------


def admin_client(kubeconfig: Path) -> Any:
    return api_client(kubeconfig)


def proxied_client(kubeconfig: Path, port: int) -> Any:
    """A client whose every request goes through the test's proxy on `port`."""
    client = admin_client(kubeconfig)
    client.configuration.host = f"https://127.0.0.1:{port}"
    return client


def apiserver_address(kube: Any) -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(kube.configuration.host)
    assert url.hostname and url.port
    return url.hostname, url.port


def test_agent_keeps_serving_while_the_api_server_is_unreachable_and_catches_up(
    control_plane: Any, kube: Any, namespace: str, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    d1, d_mlp = digest(root, "classifier", "1"), digest(root, "mlp", "1")
    create_edge_node(kube, name, [spec_entry("classifier", "1", d1)])
    cluster = Cluster(kube)
    x = images(3, seed=2)
    lease_name = names.agent_name(name)

    async def main() -> None:
        proxy = TcpProxy(*apiserver_address(kube))
        await proxy.start()
        settings = fast_settings(name, namespace, tmp_path / "state")
        async with running(
            Agent(root, settings, proxied_client(control_plane.kubeconfig, proxy.port))
        ) as agent:

            async def ready(model: str) -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                m = status_model(en, model, "1")
                return en if m and m["state"] == "Ready" else None

            await eventually(lambda: ready("classifier"), what="classifier:1 Ready")
            assert agent.link.connected

            # the link goes down
            await proxy.stop()

            async def offline() -> bool:
                return not agent.link.connected

            await eventually(offline, timeout_s=10, what="the link to notice the outage")
            before = (await cluster.lease(lease_name, namespace)).spec.renew_time
            both = [spec_entry("classifier", "1", d1), spec_entry("mlp", "1", d_mlp)]
            gen = await cluster.patch_spec(name, {"models": both})
            for _ in range(5):  # it keeps serving its last assignment meanwhile
                out = await agent.engine.infer("classifier", None, {"image": x})
                np.testing.assert_allclose(out["logits"], reference(root, "classifier", "1", x), atol=1e-5)
                await asyncio.sleep(0.2)
            assert not agent.link.connected and agent.link.stats.api_errors > 0
            assert not agent.scheduler.is_resident(MLP)  # it cannot know of the new spec yet
            en = await cluster.edge_node(name)
            assert status_model(en, "mlp", "1") is None
            assert (await cluster.lease(lease_name, namespace)).spec.renew_time == before

            # the link comes back: the new spec is applied, status and Lease catch up
            relists = agent.link.stats.relists
            await proxy.start()
            en = await eventually(lambda: ready("mlp"), what="mlp:1 Ready after the link returned")
            assert en["status"]["observedGeneration"] == en["metadata"]["generation"] >= gen
            # the watch resumed from its resourceVersion (the edit came as an event), no relist
            assert agent.link.stats.relists == relists
            assert agent.link.connected and agent.scheduler.is_resident(MLP)
            renewed = await eventually(
                lambda: _renewed_after(cluster, lease_name, namespace, before),
                timeout_s=5,
                what="Lease renewed",
            )
            assert renewed
        await proxy.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


async def _renewed_after(cluster: Cluster, lease: str, namespace: str, before: Any) -> bool:
    return bool((await cluster.lease(lease, namespace)).spec.renew_time > before)


def test_a_restart_without_the_api_server_serves_the_persisted_assignment(
    control_plane: Any, kube: Any, namespace: str, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    d2, d_mlp = digest(root, "classifier", "2"), digest(root, "mlp", "1")
    models = [spec_entry("classifier", "2", d2, pinned=True), spec_entry("mlp", "1", d_mlp, preload=False)]
    create_edge_node(kube, name, models)
    cluster = Cluster(kube)
    state = tmp_path / "state"
    x = images(2, seed=3)

    async def main() -> None:
        proxy = TcpProxy(*apiserver_address(kube))
        await proxy.start()
        settings = fast_settings(name, namespace, state)
        # a first life, online: the assignment is persisted
        async with running(
            Agent(root, settings, proxied_client(control_plane.kubeconfig, proxy.port))
        ) as agent:

            async def reported() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                return en if ready_condition(en) == "True" else None

            await eventually(reported, what="the first life's status")
            assert agent.link.source == "live" and agent.link.stats.persisted_writes >= 1
        await proxy.stop()

        # a second life, with the API server out of reach from the start
        agent = Agent(root, settings, proxied_client(control_plane.kubeconfig, proxy.port))
        async with running(agent):
            assert agent.link.source == "persisted" and not agent.link.connected
            assert await agent.link.wait_converged(15)
            assert agent.scheduler.is_resident(C2)  # preloaded (and pinned), as the spec said
            assert not agent.scheduler.is_resident(MLP)  # preload: false, it loads on demand
            out = await agent.engine.infer("classifier", None, {"image": x})
            np.testing.assert_allclose(out["logits"], reference(root, "classifier", "2", x), atol=1e-5)
            feats = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
            scores = await agent.engine.infer("mlp", "1", {"features": feats})
            assert scores["scores"].shape == (2, 4) and agent.scheduler.is_resident(MLP)

            # the API server returns: the link confirms the assignment and reports
            heartbeat_before = (await cluster.edge_node(name))["status"]["heartbeatTime"]
            await proxy.start()

            async def live() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                fresh = en["status"]["heartbeatTime"] != heartbeat_before
                return en if agent.link.connected and agent.link.source == "live" and fresh else None

            en = await eventually(live, what="the link back online")
            states = {(m["model"], m["version"]): m["state"] for m in en["status"]["models"]}
            assert states == {("classifier", "2"): "Ready", ("mlp", "1"): "Ready"}
        await proxy.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_refused_call_is_not_an_outage(
    control_plane: Any, kube: Any, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    """The API server answering 4xx (here: the Lease's namespace does not exist) is logged and
    retried at the normal pace; the link stays up and the status is still written."""
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo / "mlp", root / "mlp")
    create_edge_node(kube, name, [spec_entry("mlp", "1", digest(root, "mlp", "1"))])
    cluster = Cluster(kube)

    async def main() -> None:
        settings = fast_settings(name, f"no-such-namespace-{uuid.uuid4().hex[:6]}", tmp_path / "state")
        async with running(Agent(root, settings, admin_client(control_plane.kubeconfig))) as agent:

            async def reported() -> dict[str, Any] | None:
                en = await cluster.edge_node(name)
                return en if ready_condition(en) == "True" else None

            await eventually(reported, what="status despite the refused Lease")
            await asyncio.sleep(1.2)  # a few renewal periods
            stats = agent.link.stats
            assert agent.link.connected and stats.offline_since_s is None
            assert 2 <= stats.errors_by_call["lease"] <= 6 and "404" in stats.last_error
            assert stats.lease_renewals == 0

    asyncio.run(asyncio.wait_for(main(), 60))


# --- the command line -------------------------------------------------------------------------


@pytest.mark.slow  # a whole agent process: torch, kubernetes and aiohttp imports
def test_serve_with_edge_node_runs_the_link(
    control_plane: Any, kube: Any, namespace: str, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    """`edgefleet-agent serve --edge-node NAME --kubeconfig PATH`: a real agent process loads
    what its EdgeNode assigns, reports it (with its thermal monitor's reading), and serves
    only that over HTTP."""
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    create_edge_node(kube, name, [spec_entry("classifier", "2", digest(root, "classifier", "2"))])
    command = [
        sys.executable, "-m", "node_agent.cli", "serve", "--edge-node", name,
        "--kubeconfig", str(control_plane.kubeconfig), "--namespace", namespace,
        "--model-repository", str(root), "--host", "127.0.0.1", "--port", "0",
        "--endpoint", "http://agent.test:8000", "--thermal-source", "simulated",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        cluster = Cluster(kube)

        async def reported() -> dict[str, Any] | None:
            en = await cluster.edge_node(name)
            gpu = (en or {}).get("status", {}).get("gpu", {})
            return en if ready_condition(en) == "True" and "temperatureC" in gpu else None

        en = asyncio.run(
            eventually(reported, timeout_s=40, what=f"the agent process's status; output: {lines}")
        )
        assert en["status"]["endpoint"] == "http://agent.test:8000"
        assert en["status"]["gpu"]["softLimitC"] == 75.0  # the simulated 83 C slowdown - 8 K
        assert status_model(en, "classifier", "2")["state"] == "Ready"  # type: ignore[index]
        assert (tmp_path / "models" / ".edgefleet" / f"assignment-{name}.json").is_file()
        port = next(int(m.group(1)) for line in lines if (m := re.search(r"http://127\.0\.0\.1:(\d+)", line)))
        x = images(1, seed=5)
        body = {
            "inputs": [
                {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }

        def post(model: str) -> tuple[int, dict[str, Any]]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read() or b"{}")

        code, out = post("classifier")
        assert code == 200, out
        logits = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
        np.testing.assert_allclose(logits, reference(root, "classifier", "2", x), rtol=1e-4, atol=1e-4)
        code, out = post("mlp")  # in the repository, but not assigned to this node
        assert code == 404, out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, lines


# --- counters for the canary judge ----------------------------------------------------------


class InProcessAgent:
    """A real agent in EdgeNode mode (`node_agent.agent.Agent` with an `EdgeNodeMode`) on its own
    event loop thread, listening on 127.0.0.1."""

    def __init__(self, root: Path, link: LinkSettings, kubeconfig: Path) -> None:
        from node_agent.agent import Agent as NodeAgent
        from node_agent.agent import AgentSettings
        from node_agent.link.mode import EdgeNodeMode
        from node_agent.serving.http import HttpSettings

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self.thread.start()
        mode = EdgeNodeMode(link, kubeconfig, ready_timeout_s=30)
        settings = AgentSettings(
            model_repository=root, http=HttpSettings(host="127.0.0.1", port=0), thermal_source="off"
        )
        self.agent = NodeAgent(settings, extensions=[mode], overlay=mode.configs)
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(60)
        self.url = f"127.0.0.1:{self.agent.port}"

    def post(self, path: str, x: np.ndarray, **parameters: Any) -> int:
        return post_infer(self.url, path, x, **parameters)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.agent.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_counters_reach_the_edge_node_status_and_a_restart_starts_a_new_epoch(
    control_plane: Any, kube: Any, namespace: str, edge_node_name: str, example_repo: Path, tmp_path: Path
) -> None:
    """What a sequential canary judge reads: per model version, cumulative requests, errors and
    slow requests (past the service's SLO latency) in EdgeNode status, through the API server
    (the CRD keeps them); a restarted agent reports a new epoch and counts from 0."""
    name = edge_node_name
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    slow_sla = {"p99LatencyMs": 1.0, "windowSeconds": 60}  # the slow version takes ~10 ms and more
    create_edge_node(
        kube,
        name,
        [
            spec_entry("classifier", "1", digest(root, "classifier", "1"), trafficWeight=90),
            spec_entry("classifier", "2-slow", digest(root, "classifier", "2-slow"), trafficWeight=10,
                       sla=slow_sla),
        ],
    )  # fmt: skip
    cluster = Cluster(kube)
    link = fast_settings(name, namespace, tmp_path / "state")
    x = images(1, seed=3)

    async def counted(version: str, requests: int) -> dict[str, Any] | None:
        m = status_model(await cluster.edge_node(name), "classifier", version) or {}
        c = m.get("counters")
        return c if c and c["requests"] >= requests else None

    agent = InProcessAgent(root, link, control_plane.kubeconfig)
    try:
        codes = [agent.post("classifier/versions/1", x) for _ in range(5)]
        codes += [agent.post("classifier/versions/1", x, timeout=1) for _ in range(2)]  # 1 us: 504
        codes += [agent.post("classifier/versions/2-slow", x) for _ in range(4)]
        assert codes == [200] * 5 + [504] * 2 + [200] * 4
        stable = asyncio.run(eventually(lambda: counted("1", 7), what="classifier/1's counters in status"))
        canary = asyncio.run(eventually(lambda: counted("2-slow", 4), what="classifier/2-slow's counters"))
        assert {k: stable[k] for k in ("requests", "errors", "slow")} == {
            "requests": 7,
            "errors": 2,
            "slow": 0,
        }
        assert "sloLatencyMs" not in stable  # no SLO: nothing is slow
        assert canary == {
            "epoch": stable["epoch"],
            "requests": 4,
            "errors": 0,
            "slow": 4,
            "sloLatencyMs": 1.0,
        }
    finally:
        agent.close()

    again = InProcessAgent(root, link, control_plane.kubeconfig)
    try:
        assert again.post("classifier/versions/2-slow", x) == 200

        async def restarted() -> dict[str, Any] | None:
            c = await counted("2-slow", 1)
            return c if c is not None and c["epoch"] != stable["epoch"] else None

        fresh = asyncio.run(eventually(restarted, what="the restarted agent's counters"))
        assert (fresh["requests"], fresh["errors"], fresh["slow"]) == (1, 0, 1)
    finally:
        again.close()
