"""The operator's ledger of agent reports (pure): a report whose sequence went backwards is not
believed, a recreated EdgeNode starts afresh, and spec entries are dated by the generation that
set them."""

from __future__ import annotations

from typing import Any

from edgefleet_api.edge_node import EdgeNode
from edgefleet_api.model_spec import ModelRef
from edgefleet_operator.report_ledger import ReportLedger

D2 = "sha256:" + "2" * 64


def edge_node(sequence: int, generation: int = 1, version: str = "1", note: str = "") -> EdgeNode:
    entry: dict[str, Any] = {
        "service": "shop/cam",
        "model": "classifier",
        "version": version,
        "artifact": {"uri": f"repo://classifier/{version}/model.pt", "digest": D2},
    }
    return EdgeNode.from_obj(
        {
            "metadata": {"name": "n1", "generation": generation},
            "spec": {"nodeName": "n1", "models": [entry]},
            "status": {"reportSequence": sequence, "message": note, "observedGeneration": generation},
        }
    )


def test_a_report_whose_sequence_went_backwards_is_replaced_by_the_last_one_accepted() -> None:
    ledger = ReportLedger()
    assert ledger.accept(edge_node(10, note="ten"), "u1").status.message == "ten"
    assert ledger.accept(edge_node(12, note="twelve"), "u1").status.message == "twelve"
    replayed = ledger.accept(edge_node(11, generation=2, note="eleven"), "u1")
    assert replayed.status.message == "twelve" and replayed.generation == 2  # the spec is as read
    assert ledger.ignored == 1
    assert ledger.accept(edge_node(12, note="again"), "u1").status.message == "again"  # same: re-read
    assert ledger.accept(edge_node(0, note="new object"), "u2").status.message == "new object"


def test_after_a_restart_the_first_report_is_accepted() -> None:
    assert ReportLedger().accept(edge_node(3, note="first"), "u1").status.message == "first"


def test_spec_entries_are_dated_by_the_generation_that_set_them() -> None:
    ledger = ReportLedger()
    ledger.accept(edge_node(1, generation=3, version="1"), "u1")
    ledger.accept(edge_node(2, generation=4, version="1"), "u1")  # an unrelated spec change
    v1 = ("shop/cam", ModelRef("classifier", "1", D2))
    assert ledger.set_at("n1") == {v1: 3}
    ledger.accept(edge_node(3, generation=5, version="2"), "u1")
    assert ledger.set_at("n1") == {("shop/cam", ModelRef("classifier", "2", D2)): 5}
    ledger.keep_only([])
    assert ledger.set_at("n1") == {}
