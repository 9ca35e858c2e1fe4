"""`model.yaml`, the file that describes one model version, and its `ModelConfig`.

`parse_model_config` reads one strictly: an unknown field, a wrong type or a bad value is an
`InvalidModel` naming the file (as the caller names it: the repository gives it relative to
its root, never a path on disk) and the field, never a stack trace. `write_model_config`
writes one atomically; the same config always writes the same bytes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edgefleet_api.sla import NO_OBJECTIVES, SlaObjectives
from edgefleet_api.types import Priority
from node_agent.errors import InvalidModel
from node_agent.runtime.backends import FORMATS, default_artifact
from node_agent.runtime.model_names import validate_name, validate_version
from node_agent.types import V2_TO_NUMPY, ModelConfig, TensorSpec

CONFIG_FILE = "model.yaml"
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
DATATYPES: frozenset[str] = frozenset(V2_TO_NUMPY) | {"BF16"}
TASKS = ("predict", "generate")
MAX_DIMS = 8
MAX_DIM = 1 << 20
MAX_TENSOR_NAME_LEN = 128
MAX_BATCH_SIZE_LIMIT = 65536
_QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]i?)?$")
_QUANTITY_UNITS = {
    None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip

# model.yaml keys, in the order write_model_config writes them.
_FIELDS = (
    "name", "version", "format", "task", "artifact", "digest", "inputs", "outputs",
    "max_batch_size", "max_queue_delay_s", "priority", "pinned", "memory_estimate_bytes",
    "p95_latency_s", "p99_latency_s", "max_error_rate", "min_throughput_rps", "sla_window_s",
    "parameters",
)  # fmt: skip
_SLA_PARAMETERS = ("max_error_rate", "min_throughput_rps", "sla_window_s")
"""SLA objectives an older model.yaml gave as `parameters` (strings); read into the config's
typed `sla` like the fields of the same names, and not kept as parameters."""
_REQUIRED = ("name", "version", "format", "digest", "inputs", "outputs")


def parse_quantity(value: str) -> int:
    """Kubernetes-style byte quantity ('512Mi', '1.5G', '1024') -> bytes. ValueError if bad."""
    m = _QUANTITY_RE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a byte quantity (e.g. 1048576, 512Mi, 2G)")
    return math.ceil(float(m.group(1)) * _QUANTITY_UNITS[m.group(2)])


# ---------------------------------------------------------------------------------------------
# model.yaml <-> ModelConfig


class _Fields:
    """Typed access to one mapping; every error names the source and the field."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.data, self.source, self.prefix = data, source, prefix

    def error(self, key: str, message: str) -> InvalidModel:
        return InvalidModel(f"{self.source}: field '{self.prefix}{key}': {message}")

    def required(self, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise InvalidModel(f"{self.source}: missing required field '{self.prefix}{key}'")
        return self.data[key]

    def string(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key) if default is not None else self.required(key)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"expected an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"{value} is out of range [{minimum}, {maximum}]")
        return value

    def number(self, key: str, default: float | None, positive: bool) -> float | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(key, f"expected a number (seconds), got {value!r}")
        if value < 0 or (positive and value == 0):
            raise self.error(
                key, f"expected a {'positive' if positive else 'non-negative'} number, got {value!r}"
            )
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value


def config_from_mapping(data: object, source: str) -> ModelConfig:
    """Validate a model.yaml document (already loaded) into a ModelConfig.

    `source` names where it came from (a path, 'EdgeNode spec'); it starts every error message.
    """
    if not isinstance(data, Mapping):
        raise InvalidModel(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise InvalidModel(
            f"{source}: unknown field(s) {', '.join(repr(k) for k in unknown)}; "
            f"known fields are {', '.join(_FIELDS)}"
        )
    f = _Fields(data, source)
    for key in _REQUIRED:
        f.required(key)
    try:
        name = validate_name(data["name"])
    except InvalidModel as e:
        raise f.error("name", str(e)) from None
    raw_version = data["version"]
    if isinstance(raw_version, int) and not isinstance(raw_version, bool):
        raw_version = str(raw_version)  # `version: 2` is the common way to write it
    elif isinstance(raw_version, float):
        raise f.error("version", f'{raw_version!r} is a number; quote it (version: "1.10")')
    try:
        version = validate_version(raw_version)
    except InvalidModel as e:
        raise f.error("version", str(e)) from None
    fmt = f.string("format")
    if fmt not in FORMATS:
        raise f.error("format", f"unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")
    task = f.string("task", "predict")
    if task not in TASKS:
        raise f.error("task", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    artifact = _artifact(f, fmt)
    digest = f.string("digest")
    if not DIGEST_RE.match(digest):
        raise f.error("digest", f"{digest!r} is not 'sha256:' followed by 64 lowercase hex digits")
    parameters = _parameters(f)
    inputs = _tensors(f, "inputs")
    outputs = _tensors(f, "outputs")
    try:
        priority = Priority.parse(data.get("priority"))
    except (ValueError, TypeError) as e:
        raise f.error("priority", str(e)) from None
    queue_delay = f.number("max_queue_delay_s", 0.005, positive=False)
    assert queue_delay is not None
    return ModelConfig(
        name=name,
        version=version,
        format=fmt,
        inputs=inputs,
        outputs=outputs,
        artifact=artifact,
        digest=digest,
        max_batch_size=f.integer("max_batch_size", 8, 1, MAX_BATCH_SIZE_LIMIT),
        priority=priority,
        pinned=f.boolean("pinned", False),
        memory_estimate_bytes=_memory(f),
        max_queue_delay_s=queue_delay,
        sla=_sla(f, parameters),
        task=task,
        parameters={k: v for k, v in parameters.items() if k not in _SLA_PARAMETERS},
    )


def _artifact(f: _Fields, fmt: str) -> str:
    artifact = f.string("artifact", default_artifact(fmt))
    parts = Path(artifact).parts
    if Path(artifact).is_absolute() or ".." in parts or "\\" in artifact or not parts:
        raise f.error("artifact", f"{artifact!r} must be a relative path inside the version folder")
    return artifact


def _tensors(f: _Fields, key: str) -> tuple[TensorSpec, ...]:
    items = f.required(key)
    if not isinstance(items, list) or not items:
        raise f.error(key, "expected a non-empty list of tensors (name, datatype, shape)")
    specs: list[TensorSpec] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise f.error(where, f"expected a mapping with name, datatype, shape; got {item!r}")
        t = _Fields(item, f.source, prefix=f"{where}.")
        extra = sorted(str(k) for k in item if k not in ("name", "datatype", "dtype", "shape"))
        if extra:
            raise t.error(extra[0], "unknown tensor field; expected name, datatype, shape")
        tname = t.string("name")
        if len(tname) > MAX_TENSOR_NAME_LEN:
            raise t.error("name", f"longer than {MAX_TENSOR_NAME_LEN} characters")
        if "datatype" in item and "dtype" in item and item["datatype"] != item["dtype"]:
            raise t.error("datatype", "both 'datatype' and 'dtype' given, and they differ")
        dt_key = "datatype" if "datatype" in item else "dtype"
        datatype = t.string(dt_key) if dt_key in item else t.string("datatype")
        if datatype not in DATATYPES:
            raise t.error(
                dt_key,
                f"{datatype!r} is not a KServe v2 datatype; expected one of {', '.join(sorted(DATATYPES))}",
            )
        specs.append(TensorSpec(tname, datatype, _shape(t)))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise f.error(key, f"duplicate tensor name(s) {', '.join(dup)}")
    return tuple(specs)


def _shape(t: _Fields) -> tuple[int, ...]:
    shape = t.required("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise t.error("shape", f"expected a list of at most {MAX_DIMS} dimensions, got {shape!r}")
    for dim in shape:
        ok = isinstance(dim, int) and not isinstance(dim, bool)
        if not ok or not (dim == -1 or 1 <= dim <= MAX_DIM):
            raise t.error(
                "shape",
                f"dimension {dim!r} must be -1 (dynamic) or an integer in "
                f"[1, {MAX_DIM}] (shape excludes the batch dimension)",
            )
    return tuple(shape)


def _memory(f: _Fields) -> int | None:
    value = f.data.get("memory_estimate_bytes")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_quantity(value)
        except ValueError as e:
            raise f.error("memory_estimate_bytes", str(e)) from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise f.error(
            "memory_estimate_bytes",
            f"expected bytes (an integer >= 0 or a quantity such as 512Mi), got {value!r}",
        )
    return value


def _sla(f: _Fields, parameters: Mapping[str, str]) -> SlaObjectives:
    """The SLA objectives: fields, else (an older model.yaml) parameters of the same names."""
    lifted: dict[str, float] = {}
    for key in _SLA_PARAMETERS:
        if key in parameters and key not in f.data:
            try:
                lifted[key] = float(parameters[key])
            except ValueError:
                raise f.error(f"parameters.{key}", f"expected a number, got {parameters[key]!r}") from None
    window = f.data.get("sla_window_s", lifted.get("sla_window_s", 60))
    if isinstance(window, float) and window.is_integer():
        window = int(window)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise f.error("sla_window_s", f"expected whole seconds >= 1, got {window!r}")
    try:
        return SlaObjectives(
            p95_latency_s=f.number("p95_latency_s", None, positive=True),
            p99_latency_s=f.number("p99_latency_s", None, positive=True),
            max_error_rate=f.number("max_error_rate", lifted.get("max_error_rate"), positive=False),
            min_throughput_rps=f.number(
                "min_throughput_rps", lifted.get("min_throughput_rps"), positive=True
            ),
            window_s=window,
        )
    except ValueError as e:
        raise InvalidModel(f"{f.source}: {e}") from None


def _parameters(f: _Fields) -> dict[str, str]:
    value = f.data.get("parameters") or {}
    if not isinstance(value, Mapping):
        raise f.error("parameters", f"expected a mapping of strings, got {value!r}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, Mapping | list) or v is None:
            raise f.error(f"parameters.{k}", f"expected a scalar value, got {v!r}")
        out[k] = v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
    return out


def parse_model_config(path: Path | str, source: str | None = None) -> ModelConfig:
    """Read and validate one model.yaml. Raises `InvalidModel` (naming the file, as `source`
    when given, and the field)."""
    path = Path(path)
    source = source if source is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidModel(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise InvalidModel(f"{source}: cannot read: {why}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InvalidModel(f"{source}: not valid YAML{where}: {problem}") from None
    return config_from_mapping(data, source)


def config_to_mapping(config: ModelConfig) -> dict[str, Any]:
    """The model.yaml document for `config` (fields in a fixed order; `None`s left out)."""
    doc: dict[str, Any] = {
        "name": config.name,
        "version": config.version,
        "format": config.format,
        "task": config.task,
        "artifact": config.artifact,
        "digest": config.digest,
        "inputs": [_tensor_doc(t) for t in config.inputs],
        "outputs": [_tensor_doc(t) for t in config.outputs],
        "max_batch_size": config.max_batch_size,
        "max_queue_delay_s": config.max_queue_delay_s,
        "priority": config.priority.name.lower(),
        "pinned": config.pinned,
        "memory_estimate_bytes": config.memory_estimate_bytes,
        "p95_latency_s": config.sla.p95_latency_s,
        "p99_latency_s": config.sla.p99_latency_s,
        "max_error_rate": config.sla.max_error_rate,
        "min_throughput_rps": config.sla.min_throughput_rps,
        "sla_window_s": config.sla.window_s if config.sla.window_s != NO_OBJECTIVES.window_s else None,
        "parameters": dict(sorted(config.parameters.items())),
    }
    assert tuple(doc) == _FIELDS
    return {k: v for k, v in doc.items() if v is not None and v != {}}


def _tensor_doc(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def write_model_config(directory: Path | str, config: ModelConfig) -> Path:
    """Write `<directory>/model.yaml` atomically (temp file + rename); returns its path.

    The bytes depend only on `config`, so the same config always writes the same file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_mapping(config), sort_keys=False, default_flow_style=None)
    target = directory / CONFIG_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model.yaml.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
