"""`kubectl edgefleet`: the fleet, rollouts and nodes from kubectl (installed as the executable
`kubectl-edgefleet`, which kubectl runs as a plugin).

    kubectl edgefleet get [--watch SECONDS]
    kubectl edgefleet rollout status|history SERVICE [-n NAMESPACE] [--watch SECONDS]
    kubectl edgefleet rollout promote|abort|pause|resume SERVICE [-n NAMESPACE]
    kubectl edgefleet node drain|uncordon NODE
    kubectl edgefleet logs SERVICE [-n NAMESPACE] [--tail N]

It acts only through what the operator reads: the rollout-action annotation, the taint
`edgefleet.io/drain:NoExecute` (placement moves work off a node whose taint a service does not
tolerate, by its usual rules) and the Node's `spec.unschedulable`. Errors are one line on stderr
and exit status 1 (2 for bad usage); never a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from edgefleet_api import names
from edgefleet_api.rollout_status import ACTIVE, Phase
from edgefleet_operator import cli, fleet_view

DRAIN_TAINT = {"key": f"{names.GROUP}/drain", "value": "true", "effect": "NoExecute"}
"""What `node drain` adds: no service tolerates it unless it says so, so placement moves every
service's work off the node (replacements placed by the same rules as for any lost node)."""
ACTIONS = ("promote", "abort", "pause", "resume")


class PluginError(Exception):
    """A failure to report in one line (exit status 1)."""


def api_client(args: argparse.Namespace) -> Any:
    from kubernetes import config

    try:
        return config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except Exception as e:  # kubeconfig missing, malformed, unknown context
        raise PluginError(f"cannot load the kubeconfig: {e}") from None


def namespace_of(args: argparse.Namespace) -> str:
    """-n, else the kubeconfig context's namespace, else default."""
    if args.namespace:
        return str(args.namespace)
    from kubernetes import config

    try:
        contexts, current = config.list_kube_config_contexts(config_file=args.kubeconfig)
        if args.context:
            current = next((c for c in contexts if c["name"] == args.context), current)
        return str((current or {}).get("context", {}).get("namespace") or "default")
    except Exception:
        return "default"


def _custom(api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api)


def _core(api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api)


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """Run an API call; a 404 or another API error becomes a PluginError naming `what`."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn()
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f"{what} not found") from None
        raise PluginError(f"{what}: the API server answered {e.status} {e.reason}") from None
    except (HTTPError, OSError) as e:
        raise PluginError(f"{what}: cannot reach the API server ({e})") from None


def get_service(api: Any, namespace: str, name: str) -> dict[str, Any]:
    what = f"InferenceService {namespace}/{name}"
    return dict(
        _call(
            what,
            lambda: _custom(api).get_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
            ),
        )
    )


def cmd_get(args: argparse.Namespace) -> int:
    api = api_client(args)
    return cli.repeat(args.watch, lambda: _call("the fleet", lambda: cli.read_fleet(api)))


def cmd_rollout(args: argparse.Namespace) -> int:
    api, ns = api_client(args), namespace_of(args)
    if args.verb == "status":
        return cli.repeat(args.watch, lambda: fleet_view.rollout_text(get_service(api, ns, args.service)))
    if args.verb == "history":
        print(fleet_view.history_table(get_service(api, ns, args.service)))
        return 0
    obj = get_service(api, ns, args.service)
    rollout = (obj.get("status") or {}).get("rollout") or {}
    phase = Phase(rollout.get("phase", "Idle"))
    if phase not in ACTIVE or not rollout.get("stableVersion"):
        raise PluginError(
            f"{ns}/{args.service} has no canary rollout in progress (phase {phase.value}); "
            f"{args.verb} acts on one"
        )
    if (args.verb, phase) in (("pause", Phase.PAUSED), ("resume", Phase.PROGRESSING)):
        print(f"{ns}/{args.service}: already {phase.value}")
        return 0
    patch = {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: args.verb}}}
    _call(
        f"InferenceService {ns}/{args.service}",
        lambda: _custom(api).patch_namespaced_custom_object(
            names.GROUP, names.VERSION, ns, names.INFERENCE_SERVICE_PLURAL, args.service, patch
        ),
    )
    print(f"{ns}/{args.service}: {args.verb} requested at {rollout.get('step') or phase.value}")
    return 0


def drained_taints(taints: list[dict[str, Any]], drain: bool) -> list[dict[str, Any]]:
    """The Node's taints with the drain taint added (`drain`) or removed. Pure."""
    kept = [t for t in taints if t.get("key") != DRAIN_TAINT["key"]]
    return [*kept, dict(DRAIN_TAINT)] if drain else kept


def cmd_node(args: argparse.Namespace) -> int:
    api = api_client(args)
    core = _core(api)
    what = f"Node {args.node}"
    node = _call(what, lambda: core.read_node(args.node))
    if (node.metadata.labels or {}).get(names.LABEL_FLEET) is None:
        warning = f"warning: {args.node} has no {names.LABEL_FLEET} label: it is not in the fleet"
        print(warning, file=sys.stderr)
    taints = [t.to_dict() for t in node.spec.taints or []]
    drain = args.verb == "drain"
    body = {
        "metadata": {"resourceVersion": node.metadata.resource_version},
        "spec": {
            "unschedulable": drain,
            "taints": [{k: v for k, v in t.items() if v is not None} for t in drained_taints(taints, drain)],
        },
    }
    _call(what, lambda: core.patch_node(args.node, body))
    if drain:
        print(f"{args.node} drained: cordoned, and every service's work moves off it")
    else:
        print(f"{args.node} uncordoned: it takes work again")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    api, ns = api_client(args), namespace_of(args)
    key = f"{ns}/{args.service}"
    get_service(api, ns, args.service)
    edge_nodes = _call(
        "EdgeNodes",
        lambda: _custom(api).list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL),
    )["items"]
    holders = sorted(
        e["metadata"]["name"]
        for e in edge_nodes
        if any(m.get("service") == key for m in (e.get("spec") or {}).get("models") or [])
    )
    if not holders:
        raise PluginError(f"{key} is on no node yet")
    core = _core(api)
    pods = _call(
        "agent Pods",
        lambda: core.list_pod_for_all_namespaces(label_selector=f"app.kubernetes.io/name={names.AGENT_APP}"),
    ).items
    by_node = {p.metadata.labels.get(names.LABEL_NODE): p for p in pods}
    unread = []
    for node in holders:
        pod = by_node.get(node)
        if pod is None:
            unread.append(f"[{node}] no agent Pod (an agent outside Kubernetes, or not started yet)")
            continue
        try:
            text = _pod_log(core, pod.metadata.namespace, pod.metadata.name, args.tail)
        except PluginError as e:
            unread.append(f"[{node}] {e}")
            continue
        for line in text.splitlines():
            print(f"[{node}] {line}")
    for line in unread:
        print(line, file=sys.stderr)
    if len(unread) == len(holders):
        raise PluginError(f"no agent log of {key} could be read ({len(unread)} node(s))")
    return 0


def _pod_log(core: Any, namespace: str, name: str, tail: int) -> str:
    what = f"the logs of {namespace}/{name}"
    return str(_call(what, lambda: core.read_namespaced_pod_log(name, namespace, tail_lines=tail)) or "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl edgefleet", description="The edgefleet fleet, rollouts and nodes, from kubectl."
    )
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument("--context", default=None, help="kubeconfig context")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def watchable(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--watch", "-w", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS"
        )

    def service(p: argparse.ArgumentParser) -> None:
        p.add_argument("service", metavar="SERVICE", help="the InferenceService's name")
        p.add_argument("-n", "--namespace", default=None, help="its namespace (default: the context's)")

    get = sub.add_parser("get", help="nodes (class, health, memory, temperature, models) and services")
    watchable(get)
    get.set_defaults(func=cmd_get)
    rollout = sub.add_parser(
        "rollout", help="a service's rollout: status, history, promote, abort, pause, resume"
    )
    rollout.add_argument("verb", choices=("status", "history", *ACTIONS))
    service(rollout)
    watchable(rollout)
    rollout.set_defaults(func=cmd_rollout)
    node = sub.add_parser("node", help="drain a fleet node (its work moves off) or uncordon it")
    node.add_argument("verb", choices=("drain", "uncordon"))
    node.add_argument("node", metavar="NODE")
    node.set_defaults(func=cmd_node)
    logs = sub.add_parser("logs", help="the logs of the agents serving a service")
    service(logs)
    logs.add_argument("--tail", type=int, default=100, help="lines per agent (default 100)")
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "watch", 0) and args.command == "rollout" and args.verb not in ("status",):
        print("kubectl edgefleet: --watch applies to get and rollout status", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
