"""The assignment the agent keeps on disk to serve when the API server is out of reach:
`encode_persisted` / `decode_persisted` (pure; the link's watch writes and reads the file)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from node_agent.link.assignment import InvalidAssignment, parse_edge_node

PERSISTED_KIND = "PersistedAssignment"
PERSISTED_FORMAT = 1


def encode_persisted(edge_node_obj: Mapping[str, Any], saved_at: str) -> str:
    """The on-disk copy of an EdgeNode's assignment: its name, generation, resourceVersion and
    spec (never its status), as JSON with sorted keys (the same object writes the same bytes)."""
    meta = edge_node_obj.get("metadata") or {}
    if not isinstance(meta.get("name"), str):
        raise InvalidAssignment("cannot persist an EdgeNode without metadata.name")
    doc = {
        "kind": PERSISTED_KIND,
        "format": PERSISTED_FORMAT,
        "savedAt": saved_at,
        "metadata": {
            "name": meta["name"],
            "generation": int(meta.get("generation") or 0),
            "resourceVersion": str(meta.get("resourceVersion") or ""),
        },
        "spec": edge_node_obj.get("spec") or {},
    }
    return json.dumps(doc, sort_keys=True, indent=1) + "\n"


def decode_persisted(text: str, edge_node: str) -> dict[str, Any]:
    """The EdgeNode-shaped object (metadata + spec) of a persisted assignment for `edge_node`.
    `InvalidAssignment` when the text is not one (corrupt, another format, another node)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidAssignment(f"persisted assignment is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != PERSISTED_KIND:
        raise InvalidAssignment("not a persisted assignment")
    if doc.get("format") != PERSISTED_FORMAT:
        found = doc.get("format")
        raise InvalidAssignment(f"persisted assignment format {found!r}, expected {PERSISTED_FORMAT}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or meta.get("name") != edge_node:
        name = meta.get("name") if isinstance(meta, dict) else None
        raise InvalidAssignment(f"persisted assignment is for EdgeNode {name!r}, not {edge_node!r}")
    if not isinstance(doc.get("spec"), dict):
        raise InvalidAssignment("persisted assignment has no spec")
    obj = {"metadata": meta, "spec": doc["spec"]}
    parse_edge_node(obj)  # raises InvalidAssignment if it cannot be used
    return obj
