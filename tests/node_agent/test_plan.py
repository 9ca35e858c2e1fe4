"""The reconcile plan, pure: desired versions + what the runtime has -> what to do."""

from __future__ import annotations

from edge_node_specs import C1, C2, D1, D2, GIB, MLP, assignment, entry

from edgefleet_api.types import ModelId
from node_agent.link.plan import ModelView, RuntimeView, plan, servable_weights


def view(
    models: dict[ModelId, ModelView] | None = None, free: int = GIB, device: int = 2 * GIB
) -> RuntimeView:
    return RuntimeView(models or {}, free, device)


# --- plan -----------------------------------------------------------------------------------


def test_plan_from_nothing_prepares_everything_and_preloads_by_urgency() -> None:
    a = assignment(
        entry("mlp", priority="low"),
        entry(version="2", digest=D2, priority="critical"),
        entry(version="1", pinned=True),
        entry("lazy", preload=False),
    )
    p = plan(a, view(), now_s=0.0)
    assert [d.id for d in p.prepare] == [C1, C2, ModelId("lazy", "1"), MLP]
    assert p.preload == (C2, C1, MLP)  # critical, then normal (pinned), then low; lazy loads on demand
    assert p.unload == () and p.forget == () and not p.idle


def test_plan_unloads_what_is_no_longer_assigned_and_forgets_what_is_gone() -> None:
    a = assignment(entry())
    models = {
        C1: ModelView(D1, resident=True, preloaded=True),
        C2: ModelView(D2, resident=True, preloaded=True),
        MLP: ModelView(D1, resident=False),
    }
    p = plan(a, view(models), now_s=0.0)
    assert p.unload == (C2,) and p.forget == (MLP,)
    assert p.prepare == () and p.preload == ()


def test_a_converged_runtime_gives_an_idle_plan() -> None:
    a = assignment(entry(), entry("lazy", preload=False))
    models = {C1: ModelView(D1, resident=True, preloaded=True), ModelId("lazy", "1"): ModelView(D1)}
    assert plan(a, view(models), 0.0).idle


def test_a_changed_digest_prepares_first_then_unloads_the_stale_copy_and_preloads() -> None:
    a = assignment(entry(digest=D2))
    p = plan(a, view({C1: ModelView(D1, resident=True, preloaded=True)}), 0.0)
    assert p.unload == () and [d.artifact.digest for d in p.prepare] == [D2] and p.preload == ()
    # Prepared (the link marks the resident copy stale): unload it, then load the new artifact.
    p = plan(a, view({C1: ModelView(D2, resident=True, preloaded=True, stale=True)}), 0.0)
    assert p.unload == (C1,) and p.prepare == () and p.preload == (C1,)


def test_failures_wait_for_the_retry_interval_or_a_new_digest() -> None:
    failed = {C1: ModelView(None, failed_digest=D1, failed_at_s=100.0)}
    assert plan(assignment(entry()), view(failed), now_s=110.0, retry_failed_s=30.0).idle
    again = plan(assignment(entry()), view(failed), now_s=130.0, retry_failed_s=30.0)
    assert [d.id for d in again.prepare] == [C1] and again.preload == (C1,)
    new_digest = plan(assignment(entry(digest=D2)), view(failed), now_s=101.0)
    assert [d.artifact.digest for d in new_digest.prepare] == [D2]
    load_failed = {C1: ModelView(D1, failed_digest=D1, failed_at_s=100.0)}  # prepared, preload failed
    assert plan(assignment(entry()), view(load_failed), now_s=110.0).idle
    assert plan(assignment(entry()), view(load_failed), now_s=131.0).preload == (C1,)


def test_an_evicted_preload_comes_back_only_when_it_fits_in_free_memory() -> None:
    evicted = {C1: ModelView(D1, resident=False, preloaded=True, measured_bytes=300)}
    assert plan(assignment(entry()), view(evicted, free=299), 0.0).idle
    assert plan(assignment(entry()), view(evicted, free=300), 0.0).preload == (C1,)
    never_loaded = {C1: ModelView(D1, resident=False, preloaded=False, measured_bytes=300)}
    assert plan(assignment(entry()), view(never_loaded, free=0), 0.0).preload == (C1,)


def test_budget_is_the_spec_capped_by_the_device() -> None:
    assert plan(assignment(entry(), memoryBudgetBytes=GIB), view(device=2 * GIB), 0.0).budget_bytes == GIB
    assert (
        plan(assignment(entry(), memoryBudgetBytes=4 * GIB), view(device=2 * GIB), 0.0).budget_bytes
        == 2 * GIB
    )
    assert plan(assignment(entry()), view(device=2 * GIB), 0.0).budget_bytes == 2 * GIB


def test_draining_unloads_everything() -> None:
    models = {C1: ModelView(D1, resident=True), MLP: ModelView(D1, resident=True)}
    p = plan(assignment(entry(), entry("mlp"), drain=True), view(models), 0.0)
    assert p.unload == (C1, MLP) and p.prepare == () and p.preload == () and p.weights == {}


def test_resident_models_the_link_did_not_prepare_are_replaced_after_the_prepare() -> None:
    p = plan(assignment(entry()), view({C1: ModelView(None, resident=True)}), 0.0)
    assert p.unload == () and [d.id for d in p.prepare] == [C1]
    p = plan(assignment(entry()), view({C1: ModelView(D1, resident=True, stale=True)}), 0.0)
    assert p.unload == (C1,) and p.preload == (C1,)


# --- make before break ------------------------------------------------------------------------


def test_a_rollback_prepares_and_loads_the_target_before_it_unloads_the_canary() -> None:
    a = assignment(entry())  # back to classifier:1 from classifier:2
    canary = {C2: ModelView(D2, resident=True, preloaded=True, measured_bytes=100)}
    p = plan(a, view(canary), 0.0)
    assert p.unload == () and [d.id for d in p.prepare] == [C1] and p.preload == (C1,)
    assert p.held == (C2,) and p.forget == ()
    both = {**canary, C1: ModelView(D1, resident=True, preloaded=True)}
    p = plan(a, view(both), 0.0)
    assert p.unload == (C2,) and p.held == () and p.prepare == () and p.preload == ()


def test_a_target_that_cannot_be_fetched_leaves_the_old_version_serving() -> None:
    a = assignment(entry())
    failed = {
        C2: ModelView(D2, resident=True, preloaded=True),
        C1: ModelView(None, failed_digest=D1, failed_at_s=100.0),
    }
    p = plan(a, view(failed), now_s=110.0, retry_failed_s=30.0)
    assert p.unload == () and p.held == (C2,) and p.idle
    retry = plan(a, view(failed), now_s=131.0, retry_failed_s=30.0)
    assert [d.id for d in retry.prepare] == [C1] and retry.unload == () and retry.held == (C2,)
    # Not resident (evicted, or lazy) but prepared: held too, not forgotten.
    lazy = {C2: ModelView(D2), C1: ModelView(None, failed_digest=D1, failed_at_s=100.0)}
    assert plan(a, view(lazy), now_s=110.0).held == (C2,)
    assert plan(a, view(lazy), now_s=110.0).forget == ()


def test_where_memory_cannot_hold_both_fetch_first_then_unload_then_load() -> None:
    a = assignment(entry(memoryBudgetBytes=600))
    canary = {C2: ModelView(D2, resident=True, preloaded=True, measured_bytes=600)}
    p = plan(a, view(canary, free=100), 0.0)
    assert [d.id for d in p.prepare] == [C1] and p.preload == () and p.unload == ()
    fetched = {**canary, C1: ModelView(D1)}
    p = plan(a, view(fetched, free=100), 0.0)
    assert p.unload == (C2,) and p.preload == (C1,)
    # A load that failed for lack of memory: the old version goes, and the load is retried at once.
    short = {**canary, C1: ModelView(D1, failed_digest=D1, failed_at_s=5.0, insufficient_memory=True)}
    p = plan(assignment(entry()), view(short, free=GIB), now_s=6.0)
    assert p.unload == (C2,) and p.preload == (C1,)


def test_a_model_no_longer_assigned_at_all_is_unloaded_at_once() -> None:
    p = plan(assignment(entry("mlp")), view({C2: ModelView(D2, resident=True)}), 0.0)
    assert p.unload == (C2,) and p.held == ()


def test_servable_weights_prefer_ready_targets_then_held_versions_then_prepared_ones() -> None:
    weights = {"classifier": {"1": 100}}
    assert servable_weights(weights, [C1], ready=[C1], held=[C2]) == {"classifier": {"1": 100}}
    assert servable_weights(weights, [C1], ready=[], held=[C2]) == {"classifier": {"2": 100}}
    assert servable_weights(weights, [], ready=[], held=[C2]) == {"classifier": {"2": 100}}
    assert servable_weights(weights, [C1], ready=[], held=[]) == {"classifier": {"1": 100}}


def test_servable_weights_drop_versions_that_cannot_serve() -> None:
    weights = {"classifier": {"1": 90, "2": 10}, "mlp": {"1": 100}}
    assert servable_weights(weights, [C2]) == {"classifier": {"2": 10}}
    assert servable_weights(weights, []) == {}
