"""`edgefleet-agent`: the node agent's command line.

Subcommands live in `COMMANDS` (name -> (add_arguments, run)); adding one (e.g. `serve`)
is a pair of functions and one entry. `main` returns the process exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from node_agent import __version__
from node_agent.errors import AgentError

if TYPE_CHECKING:
    from node_agent.agent import AgentExtension, ConfigOverlay

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
N = TypeVar("N", int, float)


def _make_examples_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="repository root to write into (created if missing)"
    )


def _make_examples(args: argparse.Namespace) -> int:
    from node_agent.examples import make_examples
    from node_agent.generation.transformer import write_tiny_lm
    from node_agent.runtime.model_yaml import CONFIG_FILE

    root: Path = args.dir
    for config in [*make_examples(root), write_tiny_lm(root)]:
        print(
            f"{config.name}/{config.version}: {config.format} {config.digest} "
            f"(estimate {config.memory_estimate_bytes} bytes) "
            f"-> {root / config.name / config.version / CONFIG_FILE}"
        )
    return 0


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from node_agent.serving.http import LOOPBACK_NETWORKS

    parser.add_argument(
        "--model-repository",
        type=Path,
        required=True,
        metavar="DIR",
        help="model repository root (<model>/<version>/model.yaml)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also serve the v2 gRPC API on PORT (Triton's is 8001; 0: any free); default: off",
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' (the file's content) on every "
        "endpoint but the health probes and /metrics",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="BYTES",
        help="memory for models, e.g. 2Gi (default: GPU total minus 512Mi; 2Gi on CPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=_env_number("EDGEFLEET_WORKERS", int),
        help="stream pool workers (default: 1 on CPU, 2 on CUDA)",
    )
    urgent = _env_number("EDGEFLEET_URGENT_WORKERS", int)
    parser.add_argument(
        "--urgent-workers",
        type=int,
        default=1 if urgent is None else urgent,
        metavar="N",
        help="more workers that run only critical and high-priority batches, so they "
        "never wait for a normal batch (default 1; 0: none)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--preload",
        default="",
        metavar="M1,M2",
        help="models to load before reporting ready: name or name:version, comma-separated",
    )
    parser.add_argument(
        "--max-request-size",
        default="64Mi",
        metavar="BYTES",
        help="largest request body (default 64Mi; larger ones get 413)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a request body must arrive within this (default 60; else 408)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        metavar="N",
        help="open connections in all (default 1024; the excess gets 503 at once)",
    )
    parser.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=128,
        metavar="N",
        help="open connections from one address (default 128)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a new connection must send a request's headers within this (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a kept-alive connection must send its next request within this (default 30)",
    )
    parser.add_argument(
        "--allow-repository-control-from",
        action="append",
        metavar="CIDR",
        help="networks whose clients may load/unload models (repeatable; default "
        f"{' and '.join(LOOPBACK_NETWORKS)}; 0.0.0.0/0 allows any IPv4 client)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, keep serving this long while reporting not ready (default 0)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="longest wait for requests in progress when stopping (default 20)",
    )
    parser.add_argument(
        "--worker-stuck-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="not ready once every inference worker has run one batch this long (default 30)",
    )
    parser.add_argument(
        "--worker-dead-after",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="not live (restart me) once every inference worker has run one batch this long (default 120)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--thermal-source",
        default=os.environ.get("EDGEFLEET_THERMAL_SOURCE", "auto"),
        choices=("auto", "nvml", "sysfs", "simulated", "off"),
        help="temperature source of the thermal monitor (default auto: NVML, else a "
        "sysfs GPU zone, else none; simulated: a model heated by the agent's load)",
    )
    parser.add_argument(
        "--thermal-soft-limit",
        type=float,
        metavar="CELSIUS",
        default=_env_number("EDGEFLEET_THERMAL_SOFT_LIMIT_C", float),
        help="temperature where the agent starts lowering concurrency and batch sizes "
        "(default: --thermal-soft-margin below the hardware slowdown the sensor "
        "reports, else 75)",
    )
    parser.add_argument(
        "--thermal-soft-margin",
        type=float,
        metavar="CELSIUS",
        default=_env_number("EDGEFLEET_THERMAL_SOFT_MARGIN_C", float),
        help="degrees below the hardware slowdown temperature where mitigation starts (default 8)",
    )
    _edge_node_args(
        parser.add_argument_group(
            "EdgeNode mode",
            "follow an EdgeNode's spec from the cluster and report its status (operator_link)",
        )
    )


def _env_number(name: str, kind: type[N]) -> N | None:
    """$name as `kind` (None when unset or empty); a malformed value exits naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SystemExit(f"edgefleet-agent: ${name} is not {what}: {raw!r}") from None


def _edge_node_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--edge-node",
        metavar="NAME",
        help="serve what EdgeNode NAME assigns (its models, versions, traffic weights)",
    )
    group.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig (default $KUBECONFIG; without one: the in-cluster service account)",
    )
    group.add_argument(
        "--namespace",
        metavar="NS",
        help="namespace of the agent's Lease (default $EDGEFLEET_NAMESPACE, the service "
        "account's namespace, or 'default')",
    )
    group.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the last assignment is kept for offline restarts (default <model-repository>/.edgefleet)",
    )
    group.add_argument(
        "--download-bandwidth",
        metavar="BYTES_PER_S",
        help="limit artifact downloads of this node to this many bytes/s, all together ('5Mi', "
        "'2000000'; default $EDGEFLEET_LINK_DOWNLOAD_BANDWIDTH_BYTES_PER_S, else no limit)",
    )
    group.add_argument(
        "--download-attempts",
        type=int,
        metavar="N",
        help="transfers from the origin per artifact at most, each resuming the last (default 3)",
    )
    group.add_argument(
        "--download-backoff-max",
        type=float,
        metavar="SECONDS",
        help="longest wait between download attempts (default 30; from 1 s, doubling, jittered)",
    )
    group.add_argument(
        "--download-total",
        type=float,
        metavar="SECONDS",
        help="no download retry starts after this long (default 900)",
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="the node cache: verified artifacts by sha256, kept across restarts and shared by "
        "the node's agents (default <model-repository>/.edgefleet/cache; on the repository's "
        "filesystem, versions are hard links to it)",
    )
    group.add_argument(
        "--cache-budget",
        default="10Gi",
        metavar="BYTES",
        help="size budget of the node cache, e.g. 20Gi (default 10Gi; least recently used "
        "artifacts that no assigned version uses go first)",
    )
    group.add_argument(
        "--endpoint",
        metavar="URL",
        help="this agent's URL for EdgeNode.status (default http://$EDGEFLEET_POD_IP:<port>)",
    )


def _edge_node_mode(args: argparse.Namespace) -> tuple[list[AgentExtension], ConfigOverlay | None]:
    """(extensions, overlay) for `Agent` when --edge-node is given, else ([], None). Typed: mypy
    checks here that `EdgeNodeMode` is an `AgentExtension`, i.e. that `Agent` is the `AgentCore`
    its `start` takes."""
    if not args.edge_node:
        return [], None
    from node_agent.link.download import Delivery, DeliverySettings
    from node_agent.link.mode import EdgeNodeMode
    from node_agent.link.settings import LinkSettings
    from node_agent.runtime.model_yaml import parse_quantity

    namespace = args.namespace or os.environ.get("EDGEFLEET_NAMESPACE")
    sa_namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not namespace and sa_namespace.is_file():
        namespace = sa_namespace.read_text(encoding="utf-8").strip()
    endpoint = args.endpoint
    if endpoint is None and os.environ.get("EDGEFLEET_POD_IP"):
        endpoint = f"http://{os.environ['EDGEFLEET_POD_IP']}:{args.port}"
    download: dict[str, Any] = {}
    if args.download_bandwidth is not None:
        download["download_bandwidth_bytes_per_s"] = parse_quantity(args.download_bandwidth)
    for flag, name in (
        ("download_attempts", "download_attempts"),
        ("download_backoff_max", "download_backoff_max_s"),
        ("download_total", "download_total_s"),
    ):
        if getattr(args, flag) is not None:
            download[name] = getattr(args, flag)
    if args.download_backoff_max is not None:  # a shorter cap lowers the first delay with it
        download["download_backoff_initial_s"] = min(args.download_backoff_max, 1.0)
    link = LinkSettings.from_env(
        edge_node=args.edge_node,
        namespace=namespace or "default",
        state_dir=args.state_dir or args.model_repository / ".edgefleet",
        endpoint=endpoint,
        **download,
        cache_dir=args.cache_dir or args.model_repository / ".edgefleet" / "cache",
        cache_budget_bytes=parse_quantity(args.cache_budget),
    )
    token = args.auth_token_file.read_text(encoding="utf-8").strip() if args.auth_token_file else ""
    delivery = Delivery(
        DeliverySettings.of(link),
        peer_headers={"Authorization": f"Bearer {token}"} if token else None,
        self_url=endpoint,
    )
    mode = EdgeNodeMode(link, args.kubeconfig, delivery=delivery)
    return [mode], mode.configs


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from node_agent.agent import Agent, AgentSettings, serve
    from node_agent.control.thermal import ThermalSettings
    from node_agent.runtime.model_yaml import parse_quantity
    from node_agent.serving.connections import ConnectionLimits
    from node_agent.serving.event_loop import new_event_loop
    from node_agent.serving.grpc_server import GrpcSettings
    from node_agent.serving.http import LOOPBACK_NETWORKS, HttpSettings
    from node_agent.serving.service import HealthSettings

    try:
        token = None
        if args.auth_token_file is not None:
            token = args.auth_token_file.read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"auth token file {args.auth_token_file} is empty")
        http = HttpSettings(
            host=args.host,
            port=args.port,
            auth_token=token,
            max_request_bytes=parse_quantity(args.max_request_size),
            max_inflight_request_bytes=max(4 * parse_quantity(args.max_request_size), 256 * 2**20),
            repository_control_from=tuple(args.allow_repository_control_from or LOOPBACK_NETWORKS),
            access_log=args.access_log,
            body_timeout_s=args.body_timeout,
            connections=ConnectionLimits(
                max_connections=args.max_connections,
                max_connections_per_peer=args.max_connections_per_peer,
                header_timeout_s=args.header_timeout,
                idle_timeout_s=args.idle_timeout,
            ),
        )
        settings = AgentSettings(
            model_repository=args.model_repository,
            device=args.device,
            memory_budget_bytes=parse_quantity(args.memory_budget) if args.memory_budget else None,
            workers=args.workers,
            urgent_workers=args.urgent_workers,
            preload=tuple(p.strip() for p in args.preload.split(",") if p.strip()),
            drain_delay_s=args.drain_delay,
            drain_timeout_s=args.drain_timeout,
            http=http,
            grpc=None
            if args.grpc_port is None
            else GrpcSettings(host=args.host, port=args.grpc_port, max_concurrent_rpcs=args.max_connections),
            health=HealthSettings(
                worker_stuck_s=args.worker_stuck_after, worker_dead_s=args.worker_dead_after
            ),
            thermal_source=args.thermal_source,
            thermal=ThermalSettings(
                soft_limit_c=args.thermal_soft_limit,
                **({} if args.thermal_soft_margin is None else {"soft_margin_c": args.thermal_soft_margin}),
            ),
        )
        extensions, overlay = _edge_node_mode(args)
    except ValueError as e:
        print(f"edgefleet-agent serve: {e}", file=sys.stderr)
        return 2

    def listening(agent: Agent) -> None:
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
        print(
            f"edgefleet-agent: serving {settings.model_repository} on http://{host}:{agent.port}"
            + ("" if agent.grpc_port is None else f" and grpc://{host}:{agent.grpc_port}"),
            flush=True,
        )

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(Agent(settings, extensions=extensions, overlay=overlay), on_listening=listening))
    except ValueError as e:
        print(f"edgefleet-agent serve: {e}", file=sys.stderr)
        return 1
    return 0


def _install_args(parser: argparse.ArgumentParser) -> None:
    from node_agent.link.install import InstallSettings

    d = InstallSettings("-")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--systemd", type=Path, metavar="DIR", help="write a systemd unit into DIR (/etc/systemd/system)"
    )
    where.add_argument(
        "--static-pod",
        type=Path,
        metavar="DIR",
        help="write a static Pod manifest into DIR (/etc/kubernetes/manifests)",
    )
    parser.add_argument("--edge-node", required=True, metavar="NAME", help="the EdgeNode (the Node's name)")
    parser.add_argument("--kubeconfig", default=d.kubeconfig, metavar="FILE", help=f"default {d.kubeconfig}")
    parser.add_argument(
        "--namespace", default=d.namespace, metavar="NS", help=f"the Lease's (default {d.namespace})"
    )
    parser.add_argument("--port", type=int, default=d.port, help=f"HTTP port (default {d.port})")
    parser.add_argument("--device", default=d.device, help=f"cpu or cuda[:N] (default {d.device})")
    parser.add_argument(
        "--cache-budget", default=d.cache_budget, metavar="BYTES", help=f"default {d.cache_budget}"
    )
    parser.add_argument(
        "--endpoint", metavar="URL", help="this agent's URL for EdgeNode.status (http://NODE-IP:PORT)"
    )
    parser.add_argument(
        "--disk-root", default=d.disk_root, metavar="DIR", help=f"node disk root (default {d.disk_root})"
    )
    parser.add_argument(
        "--executable", default=d.executable, metavar="FILE", help=f"systemd: default {d.executable}"
    )
    parser.add_argument("--image", default=d.image, help=f"static Pod: the agent image (default {d.image})")


def _install(args: argparse.Namespace) -> int:
    from node_agent.link.durable import write_atomic
    from node_agent.link.install import STATIC_POD, SYSTEMD_UNIT, InstallSettings, static_pod, systemd_unit

    try:
        settings = InstallSettings(
            args.edge_node, kubeconfig=args.kubeconfig, namespace=args.namespace, port=args.port,
            device=args.device, cache_budget=args.cache_budget, endpoint=args.endpoint,
            disk_root=args.disk_root, executable=args.executable, image=args.image,
        )  # fmt: skip
    except ValueError as e:
        print(f"edgefleet-agent install: {e}", file=sys.stderr)
        return 2
    if args.systemd is not None:
        path, text, how = args.systemd / SYSTEMD_UNIT, systemd_unit(settings), "systemd"
        then = f"systemctl daemon-reload && systemctl enable --now {SYSTEMD_UNIT}"
    else:
        path, text, how = args.static_pod / STATIC_POD, static_pod(settings), "static-pod"
        then = "the kubelet starts it from its staticPodPath"
    write_atomic(path, text)
    print(f"wrote {path}; {then}")
    print(f"then: kubectl label node {args.edge_node} edgefleet.io/agent-managed-by={how}")
    return 0


COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "make-examples": (
        "write a model repository of small example models (fixed seeds, stable digests)",
        _make_examples_args,
        _make_examples,
    ),
    "serve": (
        "serve a model repository over HTTP (KServe v2 / Triton protocol), with no cluster",
        _serve_args,
        _serve,
    ),
    "install": (
        "run the agent from the node itself (a systemd unit or a static Pod), so a node that reboots "
        "with no cloud serves its last assignment from its node cache",
        _install_args,
        _install,
    ),
}
"""Subcommand name -> (one-line help, add its arguments, run it)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="edgefleet node agent: the per-GPU model runtime and inference service.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except (AgentError, OSError) as e:
        print(f"edgefleet-agent {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
