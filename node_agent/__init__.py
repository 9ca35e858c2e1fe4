"""edgefleet node agent: the per-GPU model runtime and inference service."""

__version__ = "0.1.0"
