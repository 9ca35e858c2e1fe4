"""Small builders of OpenAPI v3 schemas (with Kubernetes' extensions: CEL rules, list maps,
int-or-string quantities) and the patterns our CRDs validate with."""

from __future__ import annotations

from typing import Any

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
FORMATS = ["torchscript", "tensorrt", "onnx", "tinylm-npz", "huggingface"]
# KServe Open Inference Protocol (v2) tensor datatypes.
DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip


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
