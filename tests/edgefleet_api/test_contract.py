"""The typed models of the contract and the CRD schemas agree.

For each resource part, an example object is generated from the CRD schema with every field set.
Then, for its typed model:
- every key `from_obj` reads exists in the schema at that place (no model reads a field the API
  does not have);
- `to_obj` writes only fields the schema has, with the schema's types and enums;
- `to_obj(from_obj(example)) == example`: every field of the schema is read and written back
  (so a field added to the CRD without a model field fails here), units and rounding included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edgefleet_api.edge_node import EdgeNodeSpec, EdgeNodeStatus
from edgefleet_api.inference_service import InferenceServiceSpec, InferenceServiceStatus
from edgefleet_api.openapi import (
    DIGEST_PATTERN,
    DNS_LABEL_PATTERN,
    QUANTITY_PATTERN,
    URI_PATTERN,
    VERSION_PATTERN,
    Schema,
)
from edgefleet_api.schema_edge_node import edge_node_spec, edge_node_status
from edgefleet_api.schema_inference_service import inference_service_spec, inference_service_status
from edgefleet_api.schema_parts import model_spec

PATTERN_SAMPLES = {
    QUANTITY_PATTERN: "512Mi",
    DNS_LABEL_PATTERN: "m1",
    VERSION_PATTERN: "2",
    DIGEST_PATTERN: "sha256:" + "ab" * 32,
    URI_PATTERN: "repo://m1/2/model.pt",
}
TIME = "2026-01-02T03:04:05Z"


def example(schema: Schema, path: str = "") -> Any:
    """A value of `schema` with every property set (the last enum value, mid-range numbers)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return example(model_spec(), path)  # status.rollout's recorded model entries
    if "enum" in schema:
        return schema["enum"][-1]
    kind = schema.get("type") or ("int-or-string" if schema.get("x-kubernetes-int-or-string") else None)
    if kind == "object":
        if "additionalProperties" in schema:
            return {"key": "value"}
        return _fix(path, {k: example(s, f"{path}.{k}") for k, s in (schema.get("properties") or {}).items()})
    if kind == "array":
        return [example(schema["items"], f"{path}[]")]
    if kind == "string":
        if schema.get("format") == "date-time":
            return TIME
        return PATTERN_SAMPLES.get(schema.get("pattern", ""), "ns/x" if path.endswith("service") else "x")
    if kind == "int-or-string":
        return PATTERN_SAMPLES[schema["pattern"]]
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", 1 << 40)
        return 2 if low <= 2 <= high else low
    if kind == "number":
        return schema["maximum"] / 2 if "maximum" in schema else 1.5
    if kind == "boolean":
        return True
    raise AssertionError(f"{path}: no example for {schema}")


def _fix(path: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Cross-field rules of the schema (CEL) and derived fields."""
    if path.endswith(".waves[]"):
        for key in ("count", "sites", "sitePercent"):  # exactly one of percent, count, sites, sitePercent
            del obj[key]
    if path.endswith(".placement"):
        del obj["nodeFraction"]  # replicas and nodeFraction are exclusive
    if "nodesSummary" in obj:
        obj["nodesSummary"] = f"{obj['readyNodes']}/{obj['desiredNodes']}"
    for which in ("stable", "canary"):
        if f"{which}Version" in obj:
            obj[f"{which}Version"] = ",".join(m["version"] for m in obj[f"{which}Models"])
    return obj


class Recorder(dict):  # type: ignore[type-arg]
    """A dict that records the path of every key read from it (and from what it holds)."""

    def __init__(self, data: dict[str, Any], path: str, seen: set[str]) -> None:
        super().__init__(data)
        self.path, self.seen = path, seen

    def _wrap(self, key: str, value: Any) -> Any:
        return wrap(value, f"{self.path}.{key}", self.seen)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(f"{self.path}.{key}")
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(f"{self.path}.{key}")
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key: object) -> bool:
        self.seen.add(f"{self.path}.{key}")
        return super().__contains__(key)


def wrap(value: Any, path: str, seen: set[str]) -> Any:
    if isinstance(value, dict):
        return Recorder(value, path, seen)
    if isinstance(value, list):
        return [wrap(v, f"{path}[]", seen) for v in value]
    return value


def schema_paths(schema: Schema, path: str = "") -> Iterator[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        yield from schema_paths(model_spec(), path)
    for key, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{key}"
        yield from schema_paths(sub, f"{path}.{key}")
    if "items" in schema:
        yield from schema_paths(schema["items"], f"{path}[]")


def violations(value: Any, schema: Schema, path: str = "") -> Iterator[str]:
    """Where `value` does not fit `schema` (types, enums, unknown fields)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        yield from violations(value, model_spec(), path)
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: {value!r} is not one of {schema['enum']}"
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            yield f"{path}: {value!r} is neither an integer nor a string"
        return
    if kind and not checks[kind](value):
        yield f"{path}: {value!r} is not of type {kind}"
        return
    if kind == "object" and "properties" in schema:
        for key, sub in value.items():
            if key not in schema["properties"]:
                yield f"{path}.{key}: not in the schema"
            else:
                yield from violations(sub, schema["properties"][key], f"{path}.{key}")
        for key in schema.get("required", ()):
            if key not in value:
                yield f"{path}.{key}: required but not written"
    if kind == "array":
        for item in value:
            yield from violations(item, schema["items"], f"{path}[]")


PARTS = {
    "InferenceService.spec": (inference_service_spec, InferenceServiceSpec),
    "InferenceService.status": (inference_service_status, InferenceServiceStatus),
    "EdgeNode.spec": (edge_node_spec, EdgeNodeSpec),
    "EdgeNode.status": (edge_node_status, EdgeNodeStatus),
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_models_read_only_fields_the_crd_has(part: str) -> None:
    schema_of, model = PARTS[part]
    schema = schema_of()
    seen: set[str] = set()
    model.from_obj(wrap(example(schema), "", seen))
    known = set(schema_paths(schema))
    assert seen, "from_obj read nothing"
    assert sorted(seen - known) == [], f"{part}: read, but not in the CRD"


@pytest.mark.parametrize("part", sorted(PARTS))
def test_models_write_only_fields_the_crd_has_with_its_types(part: str) -> None:
    schema_of, model = PARTS[part]
    schema = schema_of()
    written = model.from_obj(example(schema)).to_obj()
    assert list(violations(written, schema)) == []


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_field_of_the_crd_is_read_and_written_back(part: str) -> None:
    schema_of, model = PARTS[part]
    full = example(schema_of())
    assert model.from_obj(full).to_obj() == full


def test_the_example_sets_every_field() -> None:
    """The generator leaves out only what a CEL rule forbids together (so the round trip above
    covers every other field)."""
    schema = inference_service_spec()
    full = example(schema)
    missing = set(schema_paths(schema)) - set(_paths(full))
    waves = {f".rollout.waves[].{k}" for k in ("count", "sites", "sitePercent")}
    assert missing == {".placement.nodeFraction", *waves}


def _paths(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}"
            yield from _paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            yield from _paths(v, f"{path}[]")
