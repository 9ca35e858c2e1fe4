"""`edgefleet-operator`: the operator's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from edgefleet_api import crdgen, names
from edgefleet_operator import __version__


def cmd_crds(args: argparse.Namespace) -> int:
    """Print the CustomResourceDefinitions (pipe into `kubectl apply -f -`)."""
    print("---\n".join(crdgen.render(c) for c in crdgen.all_crds().values()), end="")
    return 0


def operator_identity() -> str:
    """This operator's name among its peers: the host (in a Pod, the Pod's name) and the process.

    kopf's default asks the password database for the user's name, and a container running
    as an arbitrary uid (65532, or whatever `runAsUser` a cluster imposes) has no entry there.
    """
    import os
    import socket

    return f"{socket.gethostname()}/{os.getpid()}"


def cmd_run(args: argparse.Namespace) -> int:
    """Run the operator until interrupted."""
    import asyncio
    import logging

    import kopf

    from edgefleet_operator import handlers

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # One line per watch event ("Handler ... succeeded") is noise at fleet scale.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if getattr(args, "await_peering", 0):
        logging.getLogger(__name__).warning("--await-peering is ignored: replicas coordinate by Leases")
    handlers.IDENTITY = operator_identity()
    handlers.OWN_EVERYTHING = args.standalone
    # kopf standalone in every replica, always: our Leases are the gate (see handlers.py).
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            identity=handlers.IDENTITY,  # type: ignore[arg-type]  # kopf.Identity, a str, is not exported
            standalone=True,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0


def read_fleet(api_client: Any = None) -> str:
    """The fleet view of the cluster `api_client` reaches (default: the in-cluster config, else
    the current kubeconfig)."""
    from kubernetes import client

    from edgefleet_operator import fleet_view

    if api_client is None:
        from edgefleet_operator.handlers import kube_client

        api_client = kube_client()
    custom: Any = client.CustomObjectsApi(api_client)
    edge_nodes = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
        "items"
    ]
    services = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL)[
        "items"
    ]
    core: Any = client.CoreV1Api(api_client)
    labels = {n.metadata.name: n.metadata.labels or {} for n in core.list_node().items}
    return fleet_view.render(edge_nodes, labels, services)


def repeat(watch_s: float, render: Callable[[], str]) -> int:
    """Print `render()` once (`watch_s` 0), or every `watch_s` seconds on a cleared screen until
    interrupted."""
    import time

    while True:
        text = render()
        if not watch_s:
            print(text)
            return 0
        print("\033[2J\033[H" + time.strftime("%H:%M:%S") + "\n" + text, flush=True)
        time.sleep(watch_s)


def cmd_fleet(args: argparse.Namespace) -> int:
    """Print the fleet view once, or every --watch seconds until interrupted."""
    return repeat(args.watch, read_fleet)


def cmd_version(args: argparse.Namespace) -> int:
    print(__version__)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-operator",
        description="The edgefleet operator: places InferenceService models on edge nodes, runs "
        "node agents, and rolls new versions out in SLA-gated canary waves.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run", help="run the operator (replicas share the fleet by Leases: one writes for each shard)"
    )
    run.add_argument(
        "--standalone",
        action="store_true",
        help="no Leases: this instance writes for the whole fleet (run a single instance for sure)",
    )
    # Accepted and ignored: manifests of releases before the Leases pass it.
    run.add_argument("--await-peering", type=float, default=0, help=argparse.SUPPRESS)
    run.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="liveness endpoint URL, tied to watch and reconcile health ('' to disable)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)
    fleet = sub.add_parser("fleet", help="show nodes, models, memory, temperature, p95 and rollouts")
    fleet.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS")
    fleet.set_defaults(func=cmd_fleet)
    sub.add_parser("crds", help="print the CRDs as YAML").set_defaults(func=cmd_crds)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
