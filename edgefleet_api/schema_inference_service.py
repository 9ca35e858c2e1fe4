"""The InferenceService schema: spec (models, batching, SLA, placement, rollout strategy) and
status (`inference_service` and `rollout_status` are its typed models)."""

from __future__ import annotations

from edgefleet_api import names
from edgefleet_api.inference_service import JUDGES, ON_DEADLINE
from edgefleet_api.openapi import (
    MAX_WAVES,
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
    string_map,
    timestamp,
)
from edgefleet_api.rollout_status import MAX_TALLIES
from edgefleet_api.schema_parts import batching, conditions, model_spec, sla, sla_window


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
        "One canary wave: which nodes run the new version (a percent or count of nodes, or a "
        "number or percent of sites), and optionally the traffic weight the new version gets on "
        "those nodes.",
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
            "bakeSeconds": integer(
                "Least time this wave holds after its window began before it may advance, even "
                "when it passes earlier, seconds; defaults to analysis.bakeSeconds.",
                minimum=0,
                maximum=604800,
            ),
            "sites": integer(
                "Number of sites (the rollout's siteLabel) whose nodes run the new version, but for "
                "the ones kept on stable; sites that already hold canaries come first.",
                minimum=1,
                maximum=100000,
            ),
            "sitePercent": integer(
                "Share of the service's sites whose nodes run the new version, 1 to 100.",
                minimum=1,
                maximum=100,
            ),
        },
        rules=[
            rule(
                "[has(self.percent), has(self.count), has(self.sites), has(self.sitePercent)]"
                ".filter(x, x).size() == 1",
                "give exactly one of percent, count, sites or sitePercent",
            ),
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
            "self.all(w, has(w.percent)) || self.all(w, has(w.count))"
            " || self.exists(w, has(w.sites) || has(w.sitePercent))",
            "waves must all use percent or all use count, unless some wave picks sites",
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
            "falseRollbackRate": number(
                "Sequential judge (on the agents' request counters): the chance of ever rolling back "
                "a canary no worse than stable, however often it is checked (alpha).",
                minimum=0.000001,
                maximum=0.5,
                default=0.01,
            ),
            "errorRateIncrease": number(
                "Error-rate regression the judge must detect, absolute fraction (0.01: +1 point); "
                "a wave passes on evidence that the canary's error rate is below stable's plus this.",
                minimum=0.0001,
                maximum=0.5,
                default=0.01,
            ),
            "slowShareRatio": number(
                "Slow-share regression the judge must detect, relative (1.5: x1.5): the share of "
                "requests slower than the SLO latency.",
                minimum=1.01,
                maximum=100,
                default=1.5,
            ),
            "slowShareIncrease": number(
                "Added to the slow-share regression to detect, absolute fraction (0.005: half a "
                "point): a slow share near 0 on both sides can pass (x1.5 of 0 is 0).",
                minimum=0,
                maximum=0.5,
                default=0.005,
            ),
            "power": number(
                "Wanted chance of detecting the regression; status reports the canary requests it needs.",
                minimum=0.5,
                maximum=0.999,
                default=0.8,
            ),
            "progressDeadlineSeconds": integer(
                "A wave that reaches no verdict this long after its window began (too little traffic) "
                "does what onDeadline says; lack of data never fails a wave.",
                minimum=1,
                maximum=604800,
                default=600,
            ),
            "bakeSeconds": integer(
                "Least time each wave holds after its window began before it may advance, even "
                "when the judge and thresholds pass earlier, seconds; 0: no bake.",
                minimum=0,
                maximum=604800,
                default=0,
            ),
            "maxFailedNodePercent": number(
                "Roll a wave back when more than this percent of its canary nodes report the new "
                "version Failed, or send no report within the window; unset: never for that alone.",
                minimum=0,
                maximum=100,
            ),
            "judge": enum(
                "Sequential: where the agents report request counters, an anytime-valid sequential "
                "test of the error rate and slow share against stable decides each wave (the other "
                "limits stay hard guards), and it needs traffic; Thresholds: the limits alone.",
                list(JUDGES),
                default="Sequential",
            ),
            "onDeadline": enum(
                "At the progress deadline: Pause (resume with the resume action) or Rollback.",
                list(ON_DEADLINE),
                default="Pause",
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
            "siteLabel": string(
                "The Node label whose value names a node's site; site waves and the stable kept "
                "per site group nodes by it. Nodes without it belong to no site.",
                default=names.LABEL_SITE,
                minLength=1,
                maxLength=317,
            ),
            "keepStablePerSite": integer(
                "While a wave that replaces stable (trafficWeight 100) is judged, at least this many "
                "of each site's nodes stay on stable, in sites with more nodes than that; a wave of "
                "every node is exempt.",
                minimum=0,
                maximum=1000,
                default=1,
            ),
            "maxNodesPerMinute": integer(
                "At most this many nodes start the new version in any 60 seconds; unset: no limit. "
                "Rolling back is never paced.",
                minimum=1,
                maximum=100000,
            ),
        },
    )


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
    counter_tally = obj(
        "One model version's counts on one node in the current wave.",
        {
            "node": string("EdgeNode name."),
            "model": string("model/version."),
            "epoch": string("The agent's counter epoch of the last reading."),
            "requests": integer("Last cumulative reading: requests.", minimum=0),
            "errors": integer("Last cumulative reading: errors.", minimum=0),
            "slow": integer("Last cumulative reading: requests slower than the SLO latency.", minimum=0),
            "totalRequests": integer("Requests since the wave's window began.", minimum=0),
            "totalErrors": integer("Errors since the wave's window began.", minimum=0),
            "totalSlow": integer("Slow requests since the wave's window began.", minimum=0),
        },
    )
    metric_evidence = obj(
        "The judge's evidence on one metric.",
        {
            "name": string("error rate or slow share."),
            "verdict": enum("Verdict on this metric.", ["Pass", "Fail", "Continue"]),
            "eValueWorse": number("E-value that the canary is worse than stable (fails at 1/alpha)."),
            "eValueWithin": number(
                "E-value that the canary is better than the regression to detect (passes at 1/alpha)."
            ),
            "message": string("The evidence in words: rates, confidence sequence, e-values, power."),
        },
    )
    evidence = obj(
        "The sequential judge's evidence on the current wave so far.",
        {
            "verdict": enum("Pass (both metrics), Fail (either) or Continue.", ["Pass", "Fail", "Continue"]),
            "canaryRequests": integer("Canary requests counted in this wave.", minimum=0),
            "stableRequests": integer("Stable requests on comparable nodes in this wave.", minimum=0),
            "metrics": array("Per metric.", metric_evidence, maxItems=4),
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
            "counters": array(
                "The current wave's counter tallies per node and model version (the judge's state).",
                counter_tally,
                maxItems=MAX_TALLIES,
            ),
            "evidence": evidence,
            "pauseReason": string("Why the operator paused the rollout (progress deadline)."),
            "nodeStarts": array(
                "Canary nodes started in the last minute, by time (the maxNodesPerMinute ledger).",
                obj(
                    "Nodes started at one time.",
                    {
                        "time": timestamp("When the nodes were started."),
                        "count": integer("How many nodes were started then.", minimum=1),
                    },
                ),
                maxItems=1000,
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
