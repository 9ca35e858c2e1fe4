"""edgefleet operator: placement, node-agent pods, status and canary rollouts (kopf)."""

__version__ = "0.1.0"
