"""Names of the edgefleet API: group, versions, kinds, and the labels and annotations we own.

Everything that talks to the API server (operator, agent, tests, scripts) takes
these names from here, so a rename is one edit.
"""

from __future__ import annotations

GROUP = "edgefleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

INFERENCE_SERVICE_KIND = "InferenceService"
INFERENCE_SERVICE_PLURAL = "inferenceservices"
EDGE_NODE_KIND = "EdgeNode"
EDGE_NODE_PLURAL = "edgenodes"

CATEGORY = "edgefleet"

# Labels and annotations (all under our group's domain).
LABEL_FLEET = f"{GROUP}/fleet"
"""Node label that puts a Node into the fleet (value "true"); the fleet selector's default."""
LABEL_NODE = f"{GROUP}/node"
"""On EdgeNodes and agent Pods: the name of the Node they belong to."""
LABEL_DEVICE_CLASS = f"{GROUP}/device-class"
"""Node label: jetson-orin, jetson-nano, edge-server, ... (placement and the fleet view use it)."""
LABEL_SITE = f"{GROUP}/site"
"""Node label: the site (store, cell tower, factory) a node stands in; site waves of a rollout
group nodes by it (spec.rollout.siteLabel names another label)."""
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
"""GPU feature discovery's label for the GPU model; we read it, never write it."""
ANNOTATION_ROLLOUT_ACTION = f"{GROUP}/rollout-action"
"""On an InferenceService: promote | abort | pause | resume (consumed by the operator)."""

ANNOTATION_WORK_SINCE = f"{GROUP}/work-since"
"""On an EdgeNode: when the operator first gave it work (bounds how long its agent may take to start)."""
ANNOTATION_HEALTH = f"{GROUP}/health"
"""EdgeNode annotation: the node's health as the replica that holds its site's shard judged it (from
its Node and its agent's Lease), for the replica that places (operator site shards; absent with
none). Written on change only."""
LABEL_AGENT_MANAGED_BY = f"{GROUP}/agent-managed-by"
"""Node label: who runs the node's agent. Absent or 'operator': the operator (an agent Pod); anything
else ('systemd', 'static-pod'): something else, and the operator creates no agent Pod there."""
FINALIZER = f"{GROUP}/cleanup"

AGENT_APP = "edgefleet-agent"
"""app.kubernetes.io/name of agent Pods; also the prefix of their names and Leases."""
MANAGED_BY = "edgefleet-operator"

GPU_RESOURCE = "nvidia.com/gpu"


def agent_name(node: str) -> str:
    """Name of the agent Pod and Lease of a node."""
    return f"{AGENT_APP}-{node}"
