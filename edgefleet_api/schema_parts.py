"""Schemas of the parts both CRDs share: a model's artifact, signature, batching and SLA, the
model entry, conditions, and a measured SLA window (`model_spec`, `sla`, `conditions` are their
typed models)."""

from __future__ import annotations

from edgefleet_api.openapi import (
    DATATYPES,
    DIGEST_PATTERN,
    DNS_LABEL_PATTERN,
    FORMATS,
    PRIORITIES,
    URI_PATTERN,
    VERSION_PATTERN,
    Schema,
    array,
    boolean,
    enum,
    integer,
    list_map,
    number,
    obj,
    quantity,
    rule,
    string,
    timestamp,
)


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
                "Artifact location: repo:// (a path inside the agent's model repository), file:// "
                "(a path on the node), https:// (http://) (a download, with the model.yaml beside "
                "it) or oci://<registry>/<repository>@sha256:<manifest digest> (an ORAS-style "
                "artifact whose layers are the model and its model.yaml, or a Hugging Face "
                "checkpoint's files with its SHA256SUMS and model.yaml, each layer titled by its "
                "path). Downloads and registries need configDigest. Agents fetch from no other "
                "scheme.",
                pattern=URI_PATTERN,
                maxLength=2048,
            ),
            "digest": string(
                "sha256 digest of the artifact: 'sha256:' and 64 lowercase hex characters.",
                pattern=DIGEST_PATTERN,
            ),
            "configDigest": string(
                "sha256 digest of the model.yaml of an https:// or oci:// artifact (its signature); "
                "an agent loads no model.yaml it cannot verify, so those artifacts need it.",
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


def generation() -> Schema:
    return obj(
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
            "kvBlockTokens": integer("Tokens per KV-cache block.", minimum=1, maximum=256, default=16),
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
            "generation": generation(),
        },
        required=["name", "version", "artifact"],
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
