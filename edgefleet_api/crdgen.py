"""The edgefleet API as OpenAPI v3 schemas: generates the two CustomResourceDefinitions.

The CRDs in `crds/` (and the chart's copy) are this module's output; a test keeps
them in sync. Writing the schema in code lets the parts both resources share
(SLA, batching, artifacts, conditions) be written once, the way kubebuilder
generates CRDs from Go types.

    python -m edgefleet_api.crdgen      # rewrite crds/ and helm/edgefleet/crds/

Every field is typed and described (`kubectl explain` shows the descriptions);
cross-field rules are CEL `x-kubernetes-validations` with a `fieldPath`, so a
rejection names the field.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from edgefleet_api import names

Schema = dict[str, Any]

# Kubernetes resource.Quantity, as apimachinery validates it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
VERSION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$"
DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"
URI_PATTERN = r"^(file|https?|s3|gs|oci|pvc|repo)://\S+$"
MAX_WAVES = 10

PRIORITIES = ["critical", "high", "normal", "low"]
FORMATS = ["torchscript", "tensorrt", "onnx", "tinylm-npz"]
# KServe Open Inference Protocol (v2) tensor datatypes.
DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip


# --- small schema builders -------------------------------------------------


def obj(
    description: str,
    properties: Schema,
    required: list[str] | None = None,
    rules: list[Schema] | None = None,
    **extra: Any,
) -> Schema:
    """An object schema; `rules` are its CEL x-kubernetes-validations."""
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = required
    if rules:
        schema["x-kubernetes-validations"] = rules
    schema.update(extra)
    return schema


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def enum(description: str, values: list[str], default: str | None = None) -> Schema:
    schema = string(description, enum=values)
    if default is not None:
        schema["default"] = default
    return schema


def integer(description: str, minimum: int | None = None, maximum: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", "description": description, **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if "format" not in schema and (maximum is None or maximum > 2**31 - 1):
        schema["format"] = "int64"
    return schema


def number(
    description: str, minimum: float | None = None, maximum: float | None = None, **extra: Any
) -> Schema:
    schema: Schema = {"type": "number", "description": description, **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def boolean(description: str, default: bool | None = None) -> Schema:
    schema: Schema = {"type": "boolean", "description": description}
    if default is not None:
        schema["default"] = default
    return schema


def array(description: str, items: Schema, rules: list[Schema] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "array", "description": description, "items": items, **extra}
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def list_map(*keys: str) -> dict[str, Any]:
    """Array extensions for a list of objects keyed (and made unique) by `keys`."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


def string_map(description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def timestamp(description: str) -> Schema:
    return string(description, format="date-time")


def rule(expression: str, message: str, field_path: str | None = None, reason: str | None = None) -> Schema:
    r: Schema = {"rule": expression, "message": message}
    if field_path:
        r["fieldPath"] = field_path
    if reason:
        r["reason"] = reason
    return r


def quantity(description: str) -> Schema:
    return {
        "description": description,
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
    }


# --- shared parts ----------------------------------------------------------


def tensor_spec() -> Schema:
    return obj(
        "A named tensor of the model's signature (KServe v2 metadata).",
        {
            "name": string("Tensor name as the model declares it.", minLength=1, maxLength=128),
            "datatype": enum("KServe v2 datatype.", DATATYPES),
            "shape": array(
                "Dimensions without the batch dimension; -1 marks a dynamic dimension.",
                integer("A dimension: -1 (dynamic) or a positive size.", minimum=-1, maximum=1 << 20),
                maxItems=8,
                rules=[rule("self.all(d, d != 0)", "dimensions must be -1 (dynamic) or positive")],
            ),
        },
        required=["name", "datatype", "shape"],
    )


def tensor_list(what: str) -> Schema:
    return array(
        f"The model's {what} tensors.",
        tensor_spec(),
        maxItems=32,
        **list_map("name"),
    )


def artifact() -> Schema:
    return obj(
        "Where the model's artifact is and the digest it must have; a load whose bytes do not "
        "hash to the digest is refused.",
        {
            "uri": string(
                "Artifact location: file://, https://, s3://, gs://, oci://, pvc:// or repo:// "
                "(a path inside the agent's model repository).",
                pattern=URI_PATTERN,
                maxLength=2048,
            ),
            "digest": string(
                "sha256 digest of the artifact: 'sha256:' and 64 lowercase hex characters.",
                pattern=DIGEST_PATTERN,
            ),
        },
        required=["uri", "digest"],
    )


def sla() -> Schema:
    return obj(
        "Service-level objectives. Agents measure against them over a sliding window; violations "
        "trigger mitigation (smaller batches, shedding low priority) and are reported.",
        {
            "p95LatencyMs": number(
                "95th percentile end-to-end latency target, milliseconds.", minimum=0.1, maximum=600000
            ),
            "p99LatencyMs": number(
                "99th percentile end-to-end latency target, milliseconds.", minimum=0.1, maximum=600000
            ),
            "minThroughputRps": number(
                "Minimum sustained throughput, requests per second.", minimum=0, maximum=1e7
            ),
            "maxErrorRate": number("Maximum fraction of failed requests, 0 to 1.", minimum=0, maximum=1),
            "windowSeconds": integer(
                "Sliding window the SLA is judged over, seconds.", minimum=5, maximum=3600, default=60
            ),
        },
        rules=[
            rule(
                "!has(self.p95LatencyMs) || !has(self.p99LatencyMs) || "
                "self.p95LatencyMs <= self.p99LatencyMs",
                "p95LatencyMs must not exceed p99LatencyMs",
                field_path=".p95LatencyMs",
            ),
        ],
    )


def batching() -> Schema:
    return obj(
        "Dynamic batching. The agent collects requests up to maxBatchSize or maxQueueDelayMs, "
        "whichever comes first; with adaptive on it tunes both to meet the SLA.",
        {
            "maxBatchSize": integer("Largest batch the model runs.", minimum=1, maximum=1024, default=8),
            "maxQueueDelayMs": number(
                "Longest a request waits for a batch to fill, milliseconds.",
                minimum=0,
                maximum=10000,
                default=5,
            ),
            "adaptive": boolean("Adapt batch size and delay to the SLA's latency target.", default=True),
        },
    )


def model_spec() -> Schema:
    return obj(
        "One model of the service.",
        {
            "name": string(
                "Model name (DNS label); unique within the service; the v2 API's model name.",
                pattern=DNS_LABEL_PATTERN,
                maxLength=63,
            ),
            "version": string("Version label; changing it starts a rollout.", pattern=VERSION_PATTERN),
            "artifact": artifact(),
            "format": enum("Artifact format, which picks the backend.", FORMATS, default="torchscript"),
            "task": enum(
                "predict: tensor in, tensor out (v2 infer). generate: token generation "
                "with a paged KV cache (v2 generate).",
                ["predict", "generate"],
                default="predict",
            ),
            "inputs": tensor_list("input"),
            "outputs": tensor_list("output"),
            "memoryEstimate": quantity(
                "Expected device memory (e.g. 512Mi). Guides placement until the model has been "
                "measured on some node; measured memory wins after that."
            ),
            "priority": enum(
                "Scheduling and eviction priority. A critical service may displace a low "
                "one, never the reverse.",
                PRIORITIES,
                default="normal",
            ),
            "pinned": boolean("Never evict this model from a node's memory.", default=False),
            "generation": obj(
                "Settings for task: generate.",
                {
                    "maxTokens": integer(
                        "Default and upper bound of new tokens per request.",
                        minimum=1,
                        maximum=32768,
                        default=256,
                    ),
                    "maxSequences": integer(
                        "Sequences decoded at once per node.", minimum=1, maximum=1024, default=64
                    ),
                    "kvBlockTokens": integer(
                        "Tokens per KV-cache block.", minimum=1, maximum=256, default=16
                    ),
                },
            ),
        },
        required=["name", "version", "artifact"],
    )


def toleration() -> Schema:
    return obj(
        "Like a Pod toleration: lets the service use nodes with a matching taint.",
        {
            "key": string("Taint key; empty with operator Exists matches every taint.", maxLength=253),
            "operator": enum("How key and value are matched.", ["Exists", "Equal"], default="Equal"),
            "value": string("Taint value, for operator Equal.", maxLength=63),
            "effect": enum(
                "Taint effect to tolerate; empty tolerates all.",
                ["", "NoSchedule", "PreferNoSchedule", "NoExecute"],
            ),
        },
        rules=[
            rule(
                "self.operator == 'Exists' || (has(self.key) && self.key != '')",
                "key is required unless operator is Exists",
                field_path=".key",
            ),
            rule(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty when operator is Exists",
                field_path=".value",
            ),
        ],
    )


def placement() -> Schema:
    return obj(
        "Where the service runs. Give replicas or nodeFraction (not both); neither means every "
        "eligible node.",
        {
            "replicas": integer("Number of nodes to serve on.", minimum=0, maximum=100000),
            "nodeFraction": number(
                "Fraction of eligible nodes to serve on, above 0 and at most 1.",
                minimum=0,
                maximum=1,
                exclusiveMinimum=True,
            ),
            "nodeSelector": string_map("Node labels a node must have."),
            "tolerations": array("Taints the service tolerates.", toleration(), maxItems=32),
            "spread": obj(
                "Spread across a topology (zones, sites).",
                {
                    "topologyKey": string(
                        "Node label that names the domain.",
                        maxLength=253,
                        default="topology.kubernetes.io/zone",
                    ),
                    "maxSkew": integer(
                        "Most the node count may differ between domains.", minimum=1, maximum=1000, default=1
                    ),
                },
            ),
        },
        rules=[
            rule(
                "!(has(self.replicas) && has(self.nodeFraction))",
                "replicas and nodeFraction are mutually exclusive",
                field_path=".nodeFraction",
            ),
        ],
    )


def wave() -> Schema:
    return obj(
        "One canary wave: how many nodes run the new version (percent or count), and optionally "
        "the traffic weight the new version gets on those nodes.",
        {
            "percent": integer(
                "Share of the service's nodes on the new version, 1 to 100.", minimum=1, maximum=100
            ),
            "count": integer("Number of the service's nodes on the new version.", minimum=1, maximum=100000),
            "trafficWeight": integer(
                "Percent of a canary node's traffic sent to the new version, the stable version "
                "serving the rest side by side; 100 replaces it.",
                minimum=0,
                maximum=100,
                default=100,
            ),
            "analysisSeconds": integer(
                "Analysis window of this wave, seconds; defaults to analysis.intervalSeconds.",
                minimum=1,
                maximum=86400,
            ),
        },
        rules=[
            rule("has(self.percent) != has(self.count)", "give exactly one of percent or count"),
        ],
    )


def rising(field_name: str, strict: bool = True) -> str:
    """CEL: the waves' `field_name` values rise (strictly or not) from each wave to the next.

    Written out per index up to MAX_WAVES (this CEL has no index ranges); CEL's `||`
    absorbs the out-of-range error of a pair past the end.
    """
    op = "<" if strict else "<="
    return " && ".join(
        f"(size(self) <= {i + 1} || self[{i}].{field_name} {op} self[{i + 1}].{field_name})"
        for i in range(MAX_WAVES - 1)
    )


def waves_rules() -> list[Schema]:
    return [
        rule(
            "self.all(w, has(w.percent)) || self.all(w, has(w.count))",
            "waves must all use percent or all use count",
        ),
        rule(f"!self.all(w, has(w.percent)) || ({rising('percent')})", "wave percents must rise strictly"),
        rule(f"!self.all(w, has(w.count)) || ({rising('count')})", "wave counts must rise strictly"),
        rule(rising("trafficWeight", strict=False), "wave trafficWeights must not fall"),
    ]


def analysis() -> Schema:
    return obj(
        "How each wave is judged. Absolute thresholds apply to the new version; regression limits "
        "compare it with the stable version on comparable nodes.",
        {
            "intervalSeconds": integer(
                "Analysis window per wave, seconds.", minimum=1, maximum=86400, default=60
            ),
            "minSamples": integer(
                "Requests the new version must have served in the window before it "
                "can be judged; fewer is inconclusive and the wave holds.",
                minimum=1,
                maximum=10000000,
                default=100,
            ),
            "failureLimit": integer(
                "Failed checks that trigger a rollback.", minimum=1, maximum=100, default=1
            ),
            "maxP95LatencyMs": number("Fail when p95 latency exceeds this, milliseconds.", minimum=0.1),
            "maxP99LatencyMs": number("Fail when p99 latency exceeds this, milliseconds.", minimum=0.1),
            "maxErrorRate": number("Fail when the error rate exceeds this fraction.", minimum=0, maximum=1),
            "minThroughputRps": number(
                "Fail when throughput falls below this, requests per second.", minimum=0
            ),
            "maxLatencyRegressionPercent": number(
                "Fail when p95 or p99 is this many percent above the stable version's.",
                minimum=0,
                maximum=10000,
            ),
            "maxErrorRateIncrease": number(
                "Fail when the error rate exceeds the stable version's by this much (absolute fraction).",
                minimum=0,
                maximum=1,
            ),
            "maxTemperatureIncreaseC": number(
                "Fail when canary nodes run this many degrees Celsius hotter than stable ones.",
                minimum=0,
                maximum=100,
            ),
        },
        rules=[
            rule(
                "!has(self.maxP95LatencyMs) || !has(self.maxP99LatencyMs) || "
                "self.maxP95LatencyMs <= self.maxP99LatencyMs",
                "maxP95LatencyMs must not exceed maxP99LatencyMs",
                field_path=".maxP95LatencyMs",
            ),
        ],
    )


def rollout() -> Schema:
    return obj(
        "How a new model version reaches the fleet. Manual control: set paused to hold; annotate "
        f"{names.ANNOTATION_ROLLOUT_ACTION}=promote to finish now or =abort to go back to stable; "
        "re-applying the stable version is a fast rollback.",
        {
            "strategy": enum(
                "Canary: SLA-gated waves with automatic rollback. AllAtOnce: every node "
                "at once, no analysis.",
                ["Canary", "AllAtOnce"],
                default="Canary",
            ),
            "waves": array(
                "Canary waves, rising; after the last one the new version is promoted everywhere.",
                wave(),
                minItems=1,
                maxItems=MAX_WAVES,
                rules=waves_rules(),
            ),
            "analysis": analysis(),
            "paused": boolean("Hold the rollout at its current wave.", default=False),
        },
    )


def condition() -> Schema:
    return obj(
        "A condition, per the Kubernetes API conventions (metav1.Condition).",
        {
            "type": string("Condition type, e.g. Ready.", maxLength=316),
            "status": enum("True, False or Unknown.", ["True", "False", "Unknown"]),
            "observedGeneration": integer("The .metadata.generation the condition was set for.", minimum=0),
            "lastTransitionTime": timestamp("When the status last changed."),
            "reason": string("CamelCase reason for the last transition.", maxLength=1024),
            "message": string("Human-readable detail.", maxLength=32768),
        },
        required=["type", "status"],
    )


def conditions(description: str) -> Schema:
    return array(description, condition(), **list_map("type"))


def sla_window() -> Schema:
    return obj(
        "Measured service level over the SLA window.",
        {
            "p50LatencyMs": number("Median latency, milliseconds."),
            "p95LatencyMs": number("95th percentile latency, milliseconds."),
            "p99LatencyMs": number("99th percentile latency, milliseconds."),
            "throughputRps": number("Requests per second."),
            "errorRate": number("Fraction of failed requests."),
            "requests": integer("Requests in the window.", minimum=0),
            "windowSeconds": integer("Window length, seconds.", minimum=0),
            "met": boolean("The window met the SLA (absent: not enough requests to judge)."),
        },
    )


# --- InferenceService --------------------------------------------------------


def inference_service_spec() -> Schema:
    return obj(
        "What the user wants served, where, how fast, and how new versions roll out.",
        {
            "models": array(
                "Models of this service; names are unique.",
                model_spec(),
                minItems=1,
                maxItems=16,
                **list_map("name"),
            ),
            "batching": batching(),
            "sla": sla(),
            "placement": placement(),
            "rollout": rollout(),
        },
        required=["models"],
    )


def inference_service_status() -> Schema:
    version_count = obj(
        "Nodes serving one version.",
        {
            "version": string("Model version."),
            "desiredNodes": integer("Nodes that should serve it.", minimum=0),
            "readyNodes": integer("Nodes that report it loaded and ready.", minimum=0),
        },
    )
    node_summary = obj(
        "One node's view of this service.",
        {
            "node": string("EdgeNode name."),
            "version": string("Version it serves."),
            "ready": boolean("All of the service's models are loaded and ready there."),
            "p95LatencyMs": number("p95 latency there, milliseconds."),
            "temperatureC": number("GPU temperature, degrees Celsius."),
            "throttled": boolean("The GPU is thermally throttling."),
        },
    )
    analysis_result = obj(
        "One analysis of a wave.",
        {
            "wave": integer("Wave index, from 0.", minimum=0),
            "time": timestamp("When it was judged."),
            "result": enum("Outcome.", ["Passed", "Failed", "Inconclusive"]),
            "message": string("Which checks ran, their values and thresholds."),
        },
    )
    history_entry = obj(
        "A finished rollout.",
        {
            "fromVersion": string("Stable version before."),
            "toVersion": string("Version rolled out."),
            "result": enum("Outcome.", ["Promoted", "RolledBack", "Aborted", "Superseded"]),
            "startTime": timestamp("Start."),
            "finishTime": timestamp("End."),
            "message": string("Why it ended."),
        },
    )
    recorded_model = {
        "type": "object",
        "description": "A model entry as spec.models had it (validated there; stored as is).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    rollout_status = obj(
        "Where the rollout stands. The operator keeps its whole state here, so a restart resumes "
        "exactly where it was.",
        {
            "phase": enum(
                "Rollout phase.", ["Idle", "Progressing", "Paused", "Promoted", "RolledBack", "Aborted"]
            ),
            "stableVersion": string("Last version that was fully promoted."),
            "canaryVersion": string("Version being rolled out."),
            "currentWave": integer("Index of the current wave, from 0.", minimum=0),
            "totalWaves": integer("Number of waves.", minimum=0),
            "step": string("Human summary, e.g. 'wave 2/4 (25%)'."),
            "waveStartTime": timestamp("When the current wave's analysis window began."),
            "failedChecks": integer("Failed checks so far in this rollout.", minimum=0),
            "canaryNodes": array("Nodes on the canary version.", string("EdgeNode name.")),
            "analysis": array("Analyses so far in this rollout.", analysis_result, maxItems=64),
            "history": array("The last rollouts, newest first.", history_entry, maxItems=10),
            "message": string("Detail of the current phase."),
            "stableModels": array(
                "The stable revision's model entries (kept here: the spec may have moved on).",
                recorded_model,
                maxItems=16,
            ),
            "canaryModels": array("The canary revision's model entries.", recorded_model, maxItems=16),
            "startTime": timestamp("When the current (or last) rollout started."),
            "manuallyPaused": boolean("Paused by the pause action (until the resume action)."),
            "rollbackReason": string(
                "The failed checks and their values that rolled the canary back (while it is stopped)."
            ),
        },
    )
    return obj(
        "Observed state, written by the operator.",
        {
            "observedGeneration": integer("The .metadata.generation this status reflects.", minimum=0),
            "conditions": conditions("Ready, Progressing, Degraded."),
            "servingVersion": string("Version serving most traffic."),
            "desiredNodes": integer("Nodes the service should run on.", minimum=0),
            "readyNodes": integer("Nodes serving it ready.", minimum=0),
            "nodesSummary": string("readyNodes/desiredNodes, for kubectl get."),
            "versions": array("Node counts per version.", version_count),
            "sla": sla_window(),
            "nodes": array("Per-node summary (first 100 nodes).", node_summary, maxItems=100),
            "rollout": rollout_status,
            "url": string("In-cluster base URL of the v2 inference API for this service."),
            "endpoints": array("Agent endpoints serving the service.", string("Base URL.")),
            "message": string("Why the service is not placed or not ready, when it is not."),
        },
    )


# --- EdgeNode ---------------------------------------------------------------


def edge_node_spec() -> Schema:
    assignment = obj(
        "A model version this node must hold.",
        {
            "service": string("InferenceService as namespace/name.", maxLength=317),
            "model": string("Model name.", pattern=DNS_LABEL_PATTERN, maxLength=63),
            "version": string("Model version.", pattern=VERSION_PATTERN),
            "artifact": artifact(),
            "format": enum("Artifact format.", FORMATS, default="torchscript"),
            "task": enum("predict or generate.", ["predict", "generate"], default="predict"),
            "trafficWeight": integer(
                "Percent of this model's traffic on this node served by this version.",
                minimum=0,
                maximum=100,
                default=100,
            ),
            "memoryBudgetBytes": integer("Device memory granted to this model.", minimum=0),
            "priority": enum("Priority.", PRIORITIES, default="normal"),
            "pinned": boolean("Never evict.", default=False),
            "preload": boolean("Load before the first request.", default=True),
            "batching": batching(),
            "sla": sla(),
        },
        required=["service", "model", "version", "artifact"],
    )
    return obj(
        "What this node must hold. Written only by the operator.",
        {
            "nodeName": string("The Node this GPU belongs to.", maxLength=253),
            "gpuIndex": integer("GPU index on the node.", minimum=0, maximum=63, default=0),
            "memoryBudgetBytes": integer("Device memory the agent may use for models.", minimum=0),
            "models": array(
                "Model versions to hold, with traffic weights and budgets.",
                assignment,
                maxItems=256,
                **list_map("service", "model", "version"),
            ),
            "drain": boolean("Stop taking new requests and unload everything.", default=False),
        },
        required=["nodeName"],
        rules=[
            rule("self.nodeName == oldSelf.nodeName", "nodeName is immutable", field_path=".nodeName"),
        ],
    )


def edge_node_status() -> Schema:
    gpu = obj(
        "The GPU as the agent measures it.",
        {
            "name": string("GPU product name, or 'cpu'."),
            "memoryTotalBytes": integer("Total device memory.", minimum=0),
            "memoryUsedBytes": integer("Used device memory.", minimum=0),
            "memoryFreeBytes": integer("Free device memory.", minimum=0),
            "temperatureC": number("Temperature, degrees Celsius."),
            "softLimitC": number("Temperature above which the agent lowers concurrency."),
            "throttled": boolean("Clocks are being throttled (thermal or power)."),
            "throttleReasons": array("NVML throttle reasons, or 'simulated'.", string("A reason.")),
            "powerW": number("Power draw, watts."),
            "utilization": number("Utilization, 0 to 1."),
        },
    )
    loaded = obj(
        "A model version on this node.",
        {
            "service": string("InferenceService as namespace/name."),
            "model": string("Model name."),
            "version": string("Model version."),
            "digest": string("Digest of the loaded artifact.", pattern=DIGEST_PATTERN),
            "state": enum("Load state.", ["Pending", "Loading", "Ready", "Failed", "Unloading", "Evicted"]),
            "memoryBytes": integer("Measured device memory.", minimum=0),
            "trafficWeight": integer("Traffic weight in effect.", minimum=0, maximum=100),
            "sla": sla_window(),
            "message": string("Why it failed, when it did."),
        },
    )
    return obj(
        "What this node has. Written only by the node agent.",
        {
            "observedGeneration": integer("The spec generation the agent acted on.", minimum=0),
            "conditions": conditions("Ready, MemoryPressure, ThermalThrottling, SLAViolated."),
            "heartbeatTime": timestamp("Last status write (liveness is the Lease)."),
            "agentVersion": string("Agent version."),
            "endpoint": string("Base URL of the agent's v2 inference API."),
            "gpu": gpu,
            "models": array("Model versions held.", loaded, maxItems=256),
            "loadedModels": integer("Models loaded and ready.", minimum=0),
            "message": string("Detail, when not Ready."),
        },
    )


# --- the CRDs ----------------------------------------------------------------


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


def kopf_peering_crd() -> Schema:
    """kopf's ClusterKopfPeering: how operator replicas agree which one acts (kopf's schema, not ours)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "clusterkopfpeerings.kopf.dev",
            "labels": {"app.kubernetes.io/part-of": "edgefleet"},
        },
        "spec": {
            "scope": "Cluster",
            "group": "kopf.dev",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Peering of kopf operator replicas (each heartbeats into status).",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def support_crds() -> dict[str, Schema]:
    """CRDs of our dependencies that the install must include."""
    return {"kopf.dev_clusterkopfpeerings.yaml": kopf_peering_crd()}


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
        for name, crd_obj in {**all_crds(), **support_crds()}.items():
            (outdir / name).write_text(render(crd_obj))
            print(f"wrote {outdir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
