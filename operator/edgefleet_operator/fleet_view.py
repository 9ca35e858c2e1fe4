"""A fleet view for people: nodes (class, health, memory, temperature, models) and services
(ready nodes, version, p95, rollout wave), rendered as text from EdgeNodes and
InferenceServices. Pure rendering; `edgefleet-operator fleet` reads the objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgefleet_api import names

Obj = Mapping[str, Any]
GIB = float(1 << 30)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), *(line(r) for r in rows)])


def _condition(obj: Obj, type_: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status", "?"))
    return "-"


def nodes_table(edge_nodes: Sequence[Obj], node_labels: Mapping[str, Mapping[str, str]]) -> str:
    rows = []
    for en in sorted(edge_nodes, key=lambda e: e["metadata"]["name"]):
        name = en["metadata"]["name"]
        st = en.get("status") or {}
        gpu = st.get("gpu") or {}
        total, free = gpu.get("memoryTotalBytes"), gpu.get("memoryFreeBytes")
        mem = f"{(total - free) / GIB:.1f}/{total / GIB:.0f}G" if total and free is not None else "-"
        temp = f"{gpu['temperatureC']:.0f}C" if gpu.get("temperatureC") is not None else "-"
        if gpu.get("throttled"):
            temp += " THROTTLED"
        models = [
            f"{m.get('model')}:{m.get('version')}"
            + ("" if m.get("state") == "Ready" else f"({m.get('state')})")
            for m in st.get("models") or []
        ]
        wanted = len((en.get("spec") or {}).get("models") or [])
        rows.append(
            [
                name,
                node_labels.get(name, {}).get(names.LABEL_DEVICE_CLASS, "-"),
                _condition(en, "Ready"),
                mem,
                temp,
                f"{len(models)}/{wanted}",
                ",".join(models) or "-",
            ]
        )
    return _table(["NODE", "CLASS", "READY", "GPU-MEM", "TEMP", "MODELS", "LOADED"], rows)


def services_table(services: Sequence[Obj]) -> str:
    rows = []
    for s in sorted(services, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        st = s.get("status") or {}
        rollout = st.get("rollout") or {}
        p95 = (st.get("sla") or {}).get("p95LatencyMs")
        rows.append(
            [
                f"{s['metadata']['namespace']}/{s['metadata']['name']}",
                _condition(s, "Ready"),
                st.get("nodesSummary", "-"),
                st.get("servingVersion", "-"),
                f"{p95:.1f}" if p95 is not None else "-",
                rollout.get("step") or rollout.get("phase") or "-",
                (st.get("message") or "")[:60],
            ]
        )
    return _table(["SERVICE", "READY", "NODES", "VERSION", "P95-MS", "ROLLOUT", "MESSAGE"], rows)


def render(
    edge_nodes: Sequence[Obj], node_labels: Mapping[str, Mapping[str, str]], services: Sequence[Obj]
) -> str:
    return f"{nodes_table(edge_nodes, node_labels)}\n\n{services_table(services)}"


def rollout_text(service: Obj) -> str:
    """One service's rollout for `kubectl edgefleet rollout status`: phase and wave, versions,
    canary nodes, the judge's evidence, the analyses of this rollout."""
    meta, status = service["metadata"], service.get("status") or {}
    r = status.get("rollout") or {}
    lines = [
        f"{meta['namespace']}/{meta['name']}: {r.get('phase', 'Idle')}"
        + (f", {r['step']}" if r.get("step") else ""),
        f"  stable: {r.get('stableVersion', '-')}   canary: {r.get('canaryVersion', '-')}"
        + (f"   started: {r['startTime']}" if r.get("startTime") else ""),
    ]
    canaries = r.get("canaryNodes") or []
    if canaries:
        more = f", ... ({len(canaries) - 20} more)" if len(canaries) > 20 else ""
        shown = ", ".join(canaries[:20]) + more
        lines.append(f"  canary nodes ({len(canaries)}): {shown}")
    for key, label in (("message", "message"), ("pauseReason", "paused"), ("rollbackReason", "rolled back")):
        if r.get(key):
            lines.append(f"  {label}: {r[key]}")
    evidence = r.get("evidence") or {}
    for m in evidence.get("metrics") or []:
        lines.append(f"  judge {m.get('name', '?')}: {m.get('verdict', '?')}: {m.get('message', '')}")
    analyses = r.get("analysis") or []
    if analyses:
        lines.append("  analysis:")
        for a in analyses:
            lines.append(f"    wave {a['wave'] + 1}  {a['result']:<12}  {a['time']}  {a.get('message', '')}")
    return "\n".join(lines)


def history_table(service: Obj) -> str:
    """The service's last rollouts, newest first."""
    rows = [
        [h.get("fromVersion") or "-", h.get("toVersion", "?"), h.get("result", "?"), h.get("startTime", "-"),
         h.get("finishTime", "-"), (h.get("message") or "")[:80]]
        for h in ((service.get("status") or {}).get("rollout") or {}).get("history") or []
    ]  # fmt: skip
    return _table(["FROM", "TO", "RESULT", "STARTED", "FINISHED", "MESSAGE"], rows)
