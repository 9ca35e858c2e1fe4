"""Placement's reasons: why a node cannot take a service, why a service lost a node. Pure.

The first group is also the order in which a short service's message counts a node (each node
once, under the first reason it meets), like the scheduler's FailedScheduling.
"""

from __future__ import annotations

from edgefleet_operator.fleet_types import NodeState

# Why a node cannot take a service, in the order a node is counted (each node once).
NOT_READY = "not ready"
AGENT_SILENT = "agent silent"
NO_SELECTOR_MATCH = "didn't match node selector"
UNTOLERATED_TAINT = "had untolerated taint"
MISSING_LABEL = "missing spread label"
ALREADY_SERVING = "already serving it"
SUSPECT = "suspect (no new work)"
THROTTLED = "thermally throttled"
NEAR_THERMAL_LIMIT = "near thermal limit"
SPREAD_BLOCKED = "didn't satisfy spread constraint"
NO_MEMORY = "insufficient memory"
MEMORY_UNKNOWN = "GPU memory unknown (no nvidia.com/gpu.memory label or agent report)"
# Why a service lost a node it held.
NODE_DELETED = "node deleted"
SCALED_DOWN = "scaled down"


def hot_reason(node: NodeState, margin_c: float) -> str | None:
    """THROTTLED, NEAR_THERMAL_LIMIT (within `margin_c` of the soft limit) or None."""
    if node.throttled:
        return THROTTLED
    temp, limit = node.temperature_c, node.soft_limit_c
    if temp is not None and limit is not None and temp >= limit - margin_c:
        return NEAR_THERMAL_LIMIT
    return None
