"""The tables of bench.fleet_scale: one column per fleet size, and the agents-only runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.report import table


def per_node(d: dict[str, Any], who: str) -> str:
    p = d[f"{who}_per_node"]
    bits = (p["up_bytes_per_s"] + p["down_bytes_per_s"]) * 8
    return (
        f"{p['requests_per_s']:.3f} req/s; "
        f"{p['up_bytes_per_s']:.1f} B/s up, {p['down_bytes_per_s']:.1f} B/s down"
        f" ({p['up_bytes_per_s'] * 8 / 1000:.3f} / {bits / 1000:.2f} kbit/s)"
    )


LEASE_RATE_PER_NODE = 1 / 13.5
"""Lease renewals per agent per second when the agents keep up (every 15 s less up to 20%)."""


def behind(d: dict[str, Any]) -> str:
    """A note when the agents renewed at less than half their rate: the machine saturated, the
    fleet was not at steady state (nodes judged silent, work moved), and the column says so."""
    rate = d["agent_per_node"]["requests_per_s"]
    if rate >= LEASE_RATE_PER_NODE / 2:
        return ""
    return f" **(saturated: agents at {rate / LEASE_RATE_PER_NODE:.0%} of their rate)**"


def busiest(cores: dict[str, float]) -> str:
    top = sorted(cores.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v:.2f}" for k, v in top)


def render(runs: dict[str, dict[str, Any]]) -> str:
    sizes = sorted(runs, key=int)
    cols = [runs[k] for k in sizes]

    def row(what: str, f: Callable[[dict[str, Any]], object]) -> list[object]:
        cells: list[object] = [what]
        for r in cols:
            try:
                cells.append(f(r))
            except (KeyError, TypeError, IndexError):
                cells.append("-")
        return cells

    def s(x: float) -> str:
        return f"{x:.1f}"

    rows = [
        row("operator start -> v1 reported by every agent, s", lambda r: s(r["deploy_s"])),
        row(
            "operator pass, one Node changing every pass: p50 / p99, s",
            lambda r: "{:.2f} / {:.2f}".format(*r["passes"]["pass_p50_p99_s"]),
        ),
        row("operator CPU per pass, s", lambda r: f"{r['passes']['cpu_s_per_pass']:.2f}"),
        row("operator RSS (idle fleet), MiB", lambda r: f"{r['idle']['operator_rss_bytes'] / 2**20:.0f}"),
        row("v2 (passes 4 waves): spec change -> Promoted, s", lambda r: s(r["canaries"]["promoted_s"])),
        row(
            "v3 (fails at wave 1): failed check -> every EdgeNode spec on stable, s",
            lambda r: s(r["canaries"]["failed_to_specs_s"]),
        ),
        row(
            "v3: failed check -> every agent reports stable, s",
            lambda r: s(r["canaries"]["failed_to_reported_s"]),
        ),
        row(
            "S new services: create -> all placed, s (S)",
            lambda r: f"{r['placement']['services_s']:.1f} ({min(1000, r['nodes'])})",
        ),
        row("S Pods: create -> all bound by kube-scheduler, s", lambda r: s(r["placement"]["pods_s"])),
        row("operator / kube-scheduler time", lambda r: f"{r['placement']['ratio']:.2f}x"),
        row("operator API writes per placement", lambda r: f"{r['placement']['writes_per_placement']:.1f}"),
        row("idle, per node, agents", lambda r: per_node(r["idle"], "agent") + behind(r["idle"])),
        row("idle, per node, operator", lambda r: per_node(r["idle"], "operator")),
        row("serving, per node, agents", lambda r: per_node(r["serving"], "agent")),
        row("serving, per node, operator", lambda r: per_node(r["serving"], "operator")),
        row(
            "API server requests/s, idle (all clients)",
            lambda r: f"{r['idle']['apiserver_requests_per_s']:.0f}",
        ),
        row("CPU cores, idle: busiest", lambda r: busiest(r["idle"]["cpu_cores"])),
        row("CPU cores, one node changing: busiest", lambda r: busiest(r["passes"]["cpu_cores"])),
        row("CPU cores, serving: busiest", lambda r: busiest(r["serving"]["cpu_cores"])),
        row(
            "API server restart: ready -> converged, s (outage)",
            lambda r: f"{r['restart']['converged_s']:.0f} ({r.get('outage_s', '?')} s)",
        ),
        row(
            "restart: models moved (EdgeNode specs changed) / agent Pods rebuilt",
            lambda r: (
                f"{r['restart']['specs_changed']} / {r['restart']['pods_rebuilt']} of {r['restart']['pods']}"
            ),
        ),
        row("run", run_times),
    ]
    out = table(["nodes"] + [f"{int(k):,}" for k in sizes], rows)
    measured = [r for r in cols if "idle" in r and not behind(r["idle"])]
    if not measured:
        return out
    big = measured[-1]
    kinds = big["idle"]["agents"]
    secs, n = big["idle"]["seconds"], big["nodes"]
    breakdown = [
        [
            k,
            f"{v['requests'] / n / secs:.4f}",
            f"{v['up'] / max(v['requests'], 1):.0f}",
            f"{v['down'] / max(v['requests'], 1):.0f}",
            f"{v['up'] / n / secs * 8:.1f}",
            f"{v['down'] / n / secs * 8:.1f}",
        ]
        for k, v in kinds.items()
    ]
    return (
        out + f"\n\nWhere an idle agent's bytes go at {n:,} nodes ({secs:.0f} s window; "
        "HTTP bytes, TLS framing not counted):\n\n"
        + table(
            ["call", "requests/s per node", "bytes up each", "bytes down each", "bit/s up", "bit/s down"],
            breakdown,
        )
    )


def render_agents(runs: dict[str, dict[str, Any]]) -> str:
    """The agents-only runs: each idle agent's cost, measured and with its 300 s calls amortized."""
    rows: list[list[object]] = []
    for key in sorted(runs, key=int):
        r = runs[key]
        n, secs = r["nodes"], r["seconds"]
        lease = r["agents"]["lease"]
        up_each, down_each = (
            lease["up"] / max(lease["requests"], 1),
            lease["down"] / max(lease["requests"], 1),
        )
        rate = lease["requests"] / n / secs
        periodic_up = (
            267 + 217
        ) / 300  # a re-watch and a relist every 300 s (bytes up each, measured at 30 nodes)
        rows.append(
            [
                f"{n:,}",
                f"{rate:.4f}",
                f"{up_each:.0f} / {down_each:.0f}",
                f"{r['agent_per_node']['up_bytes_per_s'] * 8:.0f}",
                f"{(r['agent_per_node']['up_bytes_per_s'] + periodic_up) * 8:.0f}",
                f"{sum(r['agent_per_node'][k] for k in ('up_bytes_per_s', 'down_bytes_per_s')) * 8:.0f}",
                busiest(r["cpu_cores"]),
                " / ".join(
                    str(r[k] >> 20) for k in ("apiserver_rss_bytes", "etcd_rss_bytes", "simulator_rss_bytes")
                ),
            ]
        )
    return (
        "\n\nThe agents alone (`--agents-only`: EdgeNodes written as the operator would, no operator), "
        "idle, a 60 s window:\n\n"
        + table(
            [
                "nodes",
                "Lease renewals/s per node",
                "bytes up / down each",
                "bit/s up, measured",
                "bit/s up, with re-watch and relist",
                "bit/s up + down",
                "CPU cores: busiest",
                "RSS MiB: apiserver / etcd / simulator",
            ],
            rows,
        )
    )


def run_times(r: dict[str, Any]) -> str:
    """When N was run, and the phases rerun since (`--phases`) with their times."""
    phases = sorted((v, k.removesuffix("_when")) for k, v in r.items() if k.endswith("_when"))
    if "when" not in r:  # only some phases were run at N
        return "; ".join(f"{phase} {when}" for when, phase in phases)
    reruns = [f"{phase} rerun {when}" for when, phase in phases]
    return r["when"] + (f" ({'; '.join(reruns)})" if reruns else "")
