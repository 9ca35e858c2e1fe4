"""The contract between the edgefleet operator and its node agents.

Both halves import this package; it imports neither, and nothing of Kubernetes' client, kopf,
aiohttp or torch. It holds the API's names (`names`), the value types both halves share
(`types`), and the CRDs' schemas (`crdgen`).
"""

__version__ = "0.1.0"
