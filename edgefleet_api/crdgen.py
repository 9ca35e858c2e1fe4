"""The edgefleet API as OpenAPI v3 schemas: generates the two CustomResourceDefinitions.

The CRDs in `crds/` (and the chart's copy) are this module's output; a test keeps
them in sync. Writing the schema in code lets the parts both resources share
(SLA, batching, artifacts, conditions: `schema_parts`) be written once, the way
kubebuilder generates CRDs from Go types; `schema_inference_service` and
`schema_edge_node` hold the two resources' own parts, `openapi` the builders.
The typed models (`inference_service`, `edge_node`, ...) mirror these schemas; a
test keeps the two consistent.

    python -m edgefleet_api.crdgen      # rewrite crds/ and helm/edgefleet/crds/

Every field is typed and described (`kubectl explain` shows the descriptions);
cross-field rules are CEL `x-kubernetes-validations` with a `fieldPath`, so a
rejection names the field.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from edgefleet_api import names
from edgefleet_api.openapi import Schema, obj, string
from edgefleet_api.schema_edge_node import edge_node_spec, edge_node_status
from edgefleet_api.schema_inference_service import inference_service_spec, inference_service_status


def crd(
    kind: str,
    plural: str,
    scope: str,
    short_names: list[str],
    spec: Schema,
    status: Schema,
    columns: list[Schema],
    description: str,
) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{names.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "edgefleet"},
        },
        "spec": {
            "group": names.GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": [names.CATEGORY],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": obj(
                            description,
                            {
                                "apiVersion": string("API version of this object."),
                                "kind": string("Kind of this object."),
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            required=["spec"],
                        )
                    },
                }
            ],
        },
    }


def column(
    name: str, json_path: str, type_: str = "string", priority: int = 0, description: str = ""
) -> Schema:
    c: Schema = {"name": name, "type": type_, "jsonPath": json_path}
    if priority:
        c["priority"] = priority
    if description:
        c["description"] = description
    return c


AGE = column("Age", ".metadata.creationTimestamp", "date")


def inference_service_crd() -> Schema:
    return crd(
        names.INFERENCE_SERVICE_KIND,
        names.INFERENCE_SERVICE_PLURAL,
        "Namespaced",
        ["efis", "edgeisvc"],
        inference_service_spec(),
        inference_service_status(),
        [
            column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            column("Nodes", ".status.nodesSummary", description="ready/desired nodes"),
            column("Version", ".status.servingVersion"),
            column("P95-ms", ".status.sla.p95LatencyMs", "number"),
            column("Rollout", ".status.rollout.step"),
            column("Phase", ".status.rollout.phase", priority=1),
            column("URL", ".status.url", priority=1),
            AGE,
        ],
        "InferenceService: models to serve on the edge fleet, with batching, SLA, placement and "
        "rollout strategy.",
    )


def edge_node_crd() -> Schema:
    return crd(
        names.EDGE_NODE_KIND,
        names.EDGE_NODE_PLURAL,
        "Cluster",
        ["edn", "efnode"],
        edge_node_spec(),
        edge_node_status(),
        [
            column("Node", ".spec.nodeName"),
            column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            column("GPU", ".status.gpu.name"),
            column("Free", ".status.gpu.memoryFreeBytes", "integer", description="free GPU memory, bytes"),
            column("Temp-C", ".status.gpu.temperatureC", "number"),
            column("Models", ".status.loadedModels", "integer"),
            column("Heartbeat", ".status.heartbeatTime", "date", priority=1),
            AGE,
        ],
        "EdgeNode: one GPU of the fleet. spec is the operator's (what to hold); status is the "
        "agent's (what it has, memory, thermal, SLA).",
    )


def all_crds() -> dict[str, Schema]:
    """File name -> CRD object."""
    return {
        f"{names.GROUP}_{names.INFERENCE_SERVICE_PLURAL}.yaml": inference_service_crd(),
        f"{names.GROUP}_{names.EDGE_NODE_PLURAL}.yaml": edge_node_crd(),
    }


HEADER = "# Generated by `python -m edgefleet_api.crdgen`; edit edgefleet_api/crdgen.py, not this file.\n"


def render(obj_: Schema) -> str:
    return HEADER + yaml.safe_dump(obj_, sort_keys=False, width=100)


REPO = Path(__file__).resolve().parent.parent
OUTPUT_DIRS = (REPO / "crds", REPO / "helm" / "edgefleet" / "crds")
"""Where the generated CRDs live: the plain install and the chart (a test keeps both in sync)."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for out in args or [str(d) for d in OUTPUT_DIRS]:
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        for name, crd_obj in all_crds().items():
            (outdir / name).write_text(render(crd_obj))
            print(f"wrote {outdir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
