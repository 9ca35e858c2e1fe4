"""How each server is installed (pinned, in its own virtualenv), configured and started.

Every server gets the same TorchScript files and, where it batches, the model's own policy
(model.yaml: max batch, window); torch uses every core in each. All listen on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ROOT, Process, Target, cache_dir, free_port
from bench.peer_servers.formats import (
    JSON_HEADERS,
    ModelSpec,
    check_native_json,
    check_v2_binary,
    check_v2_json,
    native_json_bodies,
    v2_binary_body,
    v2_json_bodies,
)

HERE = Path(__file__).resolve().parent
THREADS = os.cpu_count() or 1
BODIES = 16
"""Distinct requests per model and format, cycled."""


@dataclass(frozen=True)
class Peer:
    """A server to compare: `requirements` pinned from PyPI into `venv` (None: ours, the project's
    own environment); `start(python, specs, workdir)` launches it and returns its targets."""

    key: str
    label: str
    requirements: tuple[str, ...]
    check: str
    settings: str
    start: Callable[[Path, list[ModelSpec], Path], tuple[Process, list[Target]]]
    needs: Callable[[list[str]], bool] = lambda _log: True
    """Setup outside pip (a JDK); False, with why in the log, when it cannot be met."""

    @property
    def venv(self) -> Path:
        return cache_dir() / f"bench-{self.key}-venv"


def spec_file(specs: list[ModelSpec], workdir: Path) -> Path:
    path = workdir / "models.json"
    path.write_text(
        json.dumps(
            [
                {
                    "name": s.name,
                    "path": s.path,
                    "shape": list(s.input_shape),
                    "max_batch": s.max_batch,
                    "window_s": s.window_s,
                    "output_name": s.output_name,
                    "threads": THREADS,
                }
                for s in specs
            ]
        )
    )
    return path


def native_targets(
    label: str,
    process: Process,
    specs: list[ModelSpec],
    url: Callable[[ModelSpec], str],
    ready_url: str,
    **ready: Callable[[int, bytes], bool],
) -> list[Target]:
    return [
        Target(
            f"{label} [{s.name}]",
            process,
            url(s),
            native_json_bodies(s.rows(BODIES)),
            JSON_HEADERS,
            check_native_json(s.output_size),
            ready_url,
            **ready,
        )
        for s in specs
    ]


def v2_targets(
    label: str, process: Process, specs: list[ModelSpec], base: str, versioned: bool, binary: bool
) -> list[Target]:
    out = []
    for s in specs:
        path = f"{base}/v2/models/{s.name}" + (f"/versions/{s.version}" if versioned else "")
        rows = s.rows(BODIES)
        fmt = " v2 JSON" if binary else ""
        out.append(
            Target(
                f"{label}{fmt} [{s.name}]",
                process,
                path + "/infer",
                v2_json_bodies(s, rows),
                JSON_HEADERS,
                check_v2_json(s.output_size),
                path + "/ready",
            )
        )
        if binary:
            pairs = [v2_binary_body(s, x) for x in rows]
            # one header length serves all: every body of a model has the same header
            assert len({h for _, h in pairs}) == 1
            headers = {
                "Inference-Header-Content-Length": pairs[0][1],
                "Content-Type": "application/octet-stream",
            }
            out.append(
                Target(
                    f"{label} v2 binary [{s.name}]",
                    process,
                    path + "/infer",
                    [b for b, _ in pairs],
                    headers,
                    check_v2_binary(s.output_size),
                    path + "/ready",
                )
            )
    return out


# --- ours --------------------------------------------------------------------------------


def start_ours(_python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    port = free_port()
    repo = Path(specs[0].path).parents[2]
    preload = ",".join(f"{s.name}:{s.version}" for s in specs)
    cmd = [
        sys.executable,
        "-m",
        "node_agent.cli",
        "serve",
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--preload",
        preload,
        "--max-connections-per-peer",
        "512",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")])}
    process = Process("edgefleet agent", cmd, workdir / "agent.log", env=env)
    return process, v2_targets(
        "edgefleet agent", process, specs, f"http://127.0.0.1:{port}", True, binary=True
    )


# --- KServe ------------------------------------------------------------------------------


def start_kserve(python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    port = free_port()
    process = Process(
        "kserve",
        [str(python), str(HERE / "kserve_app.py"), str(spec_file(specs, workdir)), str(port)],
        workdir / "kserve.log",
        cwd=workdir,
    )
    return process, v2_targets(
        f"KServe {KSERVE}", process, specs, f"http://127.0.0.1:{port}", False, binary=True
    )


# --- Ray Serve ---------------------------------------------------------------------------


def routed(name: str) -> Callable[[int, bytes], bool]:
    """Ray Serve's /-/routes lists the application at /<name> (it is deployed)."""
    return lambda status, body: status == 200 and f'"/{name}"'.encode() in body


def start_ray(python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    port = free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": str(workdir),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_LOG_TO_STDERR": "0",
    }
    env.pop("PYTHONPATH", None)
    process = Process(
        "ray",
        [str(python), str(HERE / "ray_serve_app.py"), str(spec_file(specs, workdir)), str(port)],
        workdir / "ray.log",
        cwd=workdir,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    return process, [
        Target(
            f"Ray Serve {RAY} [{s.name}]",
            process,
            f"{base}/{s.name}",
            native_json_bodies(s.rows(BODIES)),
            JSON_HEADERS,
            check_native_json(s.output_size),
            f"{base}/-/routes",
            ready=routed(s.name),
        )
        for s in specs
    ]


# --- LitServe ----------------------------------------------------------------------------


def start_litserve(python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = Process(
        "litserve",
        [str(python), str(HERE / "litserve_app.py"), str(spec_file(specs, workdir)), str(port)],
        workdir / "litserve.log",
        cwd=workdir,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    return process, native_targets(
        f"LitServe {LITSERVE}", process, specs, lambda s: f"{base}/predict/{s.name}", f"{base}/health"
    )


# --- TorchServe --------------------------------------------------------------------------

JDK_PACKAGE = "openjdk-17-jre-headless"


def ensure_java(log: list[str]) -> bool:
    """A Java runtime for TorchServe's frontend: `java` on PATH, or Debian's JRE installed with
    apt-get (as root) if it is missing."""
    if shutil.which("java"):
        return True
    if not shutil.which("apt-get") or os.geteuid() != 0:
        log.append(
            f"TorchServe needs Java: no `java` on PATH, and no apt-get as root to install {JDK_PACKAGE}"
        )
        return False
    print(f"installing {JDK_PACKAGE} with apt-get for TorchServe ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", JDK_PACKAGE]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            log.append(f"`{' '.join(cmd)}` failed: " + " / ".join(done.stderr.strip().splitlines()[-3:]))
            return False
    return bool(shutil.which("java"))


def start_torchserve(python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    store = workdir / "model-store"
    store.mkdir()
    models = {}
    for s in specs:
        extra = workdir / s.name
        extra.mkdir()
        (extra / "spec.json").write_text(json.dumps({"shape": list(s.input_shape), "threads": THREADS}))
        subprocess.run(
            [
                str(python.parent / "torch-model-archiver"),
                "--model-name",
                s.name,
                "--version",
                "1.0",
                "--serialized-file",
                s.path,
                "--handler",
                str(HERE / "torchserve_handler.py"),
                "--extra-files",
                str(extra / "spec.json"),
                "--export-path",
                str(store),
            ],
            check=True,
            capture_output=True,
            cwd=workdir,
            timeout=300,
        )
        models[s.name] = {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{s.name}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": s.max_batch,
                "maxBatchDelay": round(s.window_s * 1000),
                "responseTimeout": 60,
            }
        }
    port, management, metrics = free_port(), free_port(), free_port()
    config = workdir / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{port}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                f"model_store={store}",
                "load_models=" + ",".join(f"{s.name}.mar" for s in specs),
                "models=" + json.dumps(models),
                "default_workers_per_model=1",
                "disable_system_metrics=true",
                "job_queue_size=1000",
                "install_py_dep_per_model=false",
                "disable_token_authorization=true",
            ]
        )
        + "\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # the worker's python is the venv's
    cmd = [
        str(python.parent / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--model-store",
        str(store),
        "--ts-config",
        str(config),
        "--disable-token-auth",
    ]
    process = Process("torchserve", cmd, workdir / "torchserve.log", cwd=workdir, env=env)
    base = f"http://127.0.0.1:{port}"
    return process, native_targets(
        f"TorchServe {TORCHSERVE}", process, specs, lambda s: f"{base}/predictions/{s.name}", f"{base}/ping"
    )


# --- MLServer ----------------------------------------------------------------------------


def start_mlserver(python: Path, specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    for s in specs:
        model_dir = workdir / "mlserver" / s.name
        model_dir.mkdir(parents=True)
        shutil.copy(HERE / "mlserver_runtime.py", model_dir / "edgefleet_runtime.py")
        (model_dir / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": s.name,
                    "implementation": "edgefleet_runtime.TorchScriptRuntime",
                    "max_batch_size": s.max_batch,
                    "max_batch_time": s.window_s,
                    "parameters": {"uri": s.path, "extra": {"output": s.output_name}},
                }
            )
        )
    (workdir / "mlserver" / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "debug": False,
                "load_models_at_startup": True,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = Process(
        "mlserver",
        [str(python.parent / "mlserver"), "start", str(workdir / "mlserver")],
        workdir / "mlserver.log",
        cwd=workdir / "mlserver",
        env=env,
    )
    return process, v2_targets(
        f"MLServer {MLSERVER}", process, specs, f"http://127.0.0.1:{http}", False, binary=False
    )


KSERVE, RAY, LITSERVE, TORCHSERVE, MLSERVER = "0.21.0", "2.60.0", "0.2.19", "0.12.0", "1.7.1"

OURS = Peer(
    "ours",
    "edgefleet agent",
    (),
    "",
    "`edgefleet-agent serve`, 1 pool worker (+1 urgent worker, the default), "
    "batching per model.yaml; v2 JSON and v2 binary",
    start_ours,
)
PEERS: tuple[Peer, ...] = (
    Peer(
        "kserve",
        f"KServe {KSERVE}",
        (f"kserve=={KSERVE}",),
        "import kserve, torch",
        "KServe's Python ModelServer, 1 uvicorn worker, gRPC off, a synchronous `kserve.Model.predict` "
        "(no server-side batching: KServe batches in its agent sidecar, not in the model server); v2 REST, "
        "JSON and binary",
        start_kserve,
    ),
    Peer(
        "ray",
        f"Ray Serve {RAY}",
        (f"ray[serve]=={RAY}",),
        "import ray.serve, torch",
        "local Ray (the machine's CPUs, no dashboard), 1 replica per model (num_cpus 1, torch on every "
        "core), `@serve.batch` at the model's max batch and window; native JSON over its HTTP proxy",
        start_ray,
    ),
    Peer(
        "litserve",
        f"LitServe {LITSERVE}",
        (f"litserve=={LITSERVE}", "numpy"),
        "import litserve, torch",
        "accelerator cpu, 1 worker per API, fast_queue (ZeroMQ), 1 API server, batching at the model's "
        "max batch and window (`max_batch_size`, `batch_timeout`); native JSON",
        start_litserve,
    ),
    Peer(
        "torchserve",
        f"TorchServe {TORCHSERVE}",
        (f"torchserve=={TORCHSERVE}", f"torch-model-archiver=={TORCHSERVE}", "numpy", "pyyaml"),
        "import ts, torch",
        "Java frontend + 1 Python worker per model, server-side batching (`batchSize` = max batch, "
        "`maxBatchDelay` = window), system metrics off, token auth off; native JSON on /predictions",
        start_torchserve,
        ensure_java,
    ),
    Peer(
        "mlserver",
        f"MLServer {MLSERVER}",
        (f"mlserver=={MLSERVER}", "uvloop<0.22"),
        "import mlserver, torch",
        "adaptive batching at the model's max batch and window, its default inference worker process, "
        "a custom runtime; v2 JSON (its REST API has no binary extension); uvloop held < 0.22 "
        "(SeldonIO/MLServer#2286)",
        start_mlserver,
    ),
)
