"""The persisted assignment's format, pure."""

from __future__ import annotations

import json

import pytest
from edge_node_specs import GIB, NOW, edge_node, entry

from node_agent.link.assignment import (
    InvalidAssignment,
    parse_edge_node,
)
from node_agent.link.persistence import decode_persisted, encode_persisted

# --- persistence ----------------------------------------------------------------------------


def test_persisted_assignment_round_trips_without_status() -> None:
    obj = edge_node(entry(), entry("mlp"), generation=7, memoryBudgetBytes=GIB)
    text = encode_persisted(obj, NOW)
    assert text == encode_persisted(json.loads(json.dumps(obj)), NOW)  # same object, same bytes
    back = decode_persisted(text, "node-a")
    assert "status" not in back and "loadedModels" not in text
    assert back["metadata"] == {"name": "node-a", "generation": 7, "resourceVersion": "42"}
    assert parse_edge_node(back) == parse_edge_node(obj)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"kind": "Other"}',
        '{"kind": "PersistedAssignment", "format": 99}',
        '{"kind": "PersistedAssignment", "format": 1, "metadata": {"name": "node-a"}}',
    ],
)
def test_a_corrupt_persisted_file_is_refused(text: str) -> None:
    with pytest.raises(InvalidAssignment):
        decode_persisted(text, "node-a")


def test_a_persisted_file_of_another_node_is_refused() -> None:
    with pytest.raises(InvalidAssignment, match="node-b"):
        decode_persisted(encode_persisted(edge_node(entry()), NOW), "node-b")
