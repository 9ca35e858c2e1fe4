"""The EdgeNode schema: spec (written by the operator) and status (written by the node's agent);
`edge_node` is its typed model."""

from __future__ import annotations

from edgefleet_api.edge_node import MAX_ARTIFACT_PEERS
from edgefleet_api.openapi import (
    DIGEST_PATTERN,
    DNS_LABEL_PATTERN,
    FORMATS,
    PRIORITIES,
    VERSION_PATTERN,
    Schema,
    array,
    boolean,
    enum,
    integer,
    list_map,
    number,
    obj,
    rule,
    string,
    timestamp,
)
from edgefleet_api.schema_parts import artifact, batching, conditions, generation, sla, sla_window


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
            "generation": generation(),
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
            "prefetch": array(
                "Model versions to fetch and verify into the node cache without loading them (a "
                "rollout's next wave), so they are on the node when assigned.",
                assignment,
                maxItems=64,
            ),
            "artifactPeers": array(
                "Base URLs of agents in this node's site to fetch artifacts from (by digest) before "
                "the origin; chosen by the operator among agents that report an endpoint.",
                string("An agent's base URL (http or https).", pattern=r"^https?://\S+$", maxLength=512),
                maxItems=MAX_ARTIFACT_PEERS,
            ),
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
    counters = obj(
        "Cumulative outcome counts of this version since the agent started; they only grow within "
        "an epoch. Refusals (429/503) and client errors (4xx) are not counted.",
        {
            "epoch": string("Differs between two starts of the agent: new counts began at 0."),
            "requests": integer("Requests answered: completed plus errors.", minimum=0),
            "errors": integer(
                "Requests the model failed (500) or that missed their deadline (504).", minimum=0
            ),
            "slow": integer("Completed requests slower than sloLatencyMs.", minimum=0),
            "sloLatencyMs": number(
                "The SLO latency slow requests are counted against: the p99 objective, else the p95 "
                "one (absent: none, and slow stays 0)."
            ),
        },
        required=["epoch"],
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
            "counters": counters,
        },
    )
    return obj(
        "What this node has. Written only by the node agent.",
        {
            "observedGeneration": integer(
                "The spec generation this status describes (the agent acted on it).", minimum=0
            ),
            "conditions": conditions(
                "Ready, MemoryPressure, ThermalThrottling, SLAViolated, ServingPrevious (a version no "
                "longer assigned serves while the assigned one is not ready, e.g. cannot be fetched)."
            ),
            "heartbeatTime": timestamp("Last status write (liveness is the Lease)."),
            "reportSequence": integer(
                "Grows with every status write of the agent, across its restarts: a lower one than "
                "already seen from this node is a replayed or older report.",
                minimum=0,
            ),
            "agentVersion": string("Agent version."),
            "endpoint": string("Base URL of the agent's v2 inference API."),
            "gpu": gpu,
            "models": array("Model versions held.", loaded, maxItems=256),
            "loadedModels": integer("Models loaded and ready.", minimum=0),
            "message": string("Detail, when not Ready."),
        },
    )
