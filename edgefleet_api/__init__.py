"""The contract between the edgefleet operator and its node agents.

Both halves import this package; it imports neither, and nothing of Kubernetes' client, kopf,
aiohttp or torch. It is the only place where the API's camelCase keys, milliseconds and the
rounding of reported numbers live:

- `names`: group, versions, kinds, labels, annotations, the finalizer;
- `types`: Priority and ModelId;
- typed, frozen models with `from_obj`/`to_obj`: `model_spec` (a model, its artifact and
  batching), `sla` (objectives and measured windows), `inference_service` (spec and status),
  `rollout_status` (status.rollout), `edge_node` (spec and status), `conditions`;
- `wire`: units, times, quantities, rounding; `patch`: the JSON merge patch both halves send;
- the CRDs: `crdgen` (with `openapi`, `schema_parts`, `schema_inference_service`,
  `schema_edge_node`), kept consistent with the models by tests/edgefleet_api/test_contract.py.
"""

__version__ = "0.1.0"
