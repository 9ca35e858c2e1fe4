"""The model repository on disk: `<root>/<model>/<version>/model.yaml` plus the artifact.

Layout and invariants:
- one folder per model, one sub-folder per version; the folder names ARE the model's
  name and version, and model.yaml must repeat them (a mismatch is an `InvalidModel`);
- model names and versions are valid (`model_names`: a DNS label, as in the CRDs);
  every path the repository hands out resolves inside `root` (symlinks included);
- `model.yaml` is parsed strictly: an unknown field, a wrong type or a bad value is an
  `InvalidModel` naming the file and the field, never a stack trace;
- an artifact is loaded only after its sha256 matches the declared digest;
- writers put files in place by renaming a complete temp file (`.<name>.*.tmp`, fsynced,
  verified); temp files a killed process left are removed at start (`remove_temp_files`).

Version order ("newest") is natural sort with semver-like suffixes: digit runs compare as
numbers, and `2-rc1` (anything after the first '-') is a pre-release that sorts *before*
`2`. So `1 < 2-failing < 2-slow < 2 < 10`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edgefleet_api.sla import NO_OBJECTIVES, SlaObjectives
from edgefleet_api.types import ModelId, Priority
from node_agent.errors import DigestMismatch, InvalidModel, ModelNotFound, ModelUnavailable
from node_agent.runtime.backends import FORMATS, backend_for, default_artifact
from node_agent.runtime.model_names import VERSION_RE, validate_name, validate_version, version_sort_key
from node_agent.types import V2_TO_NUMPY, ModelConfig, TensorSpec

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend

log = logging.getLogger(__name__)

CONFIG_FILE = "model.yaml"
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
DATATYPES: frozenset[str] = frozenset(V2_TO_NUMPY) | {"BF16"}
TASKS = ("predict", "generate")
MAX_DIMS = 8
MAX_DIM = 1 << 20
MAX_TENSOR_NAME_LEN = 128
MAX_BATCH_SIZE_LIMIT = 65536
_CHUNK_BYTES = 1 << 20
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


# ---------------------------------------------------------------------------------------------
# names and digests


def sha256_file(path: Path | str) -> str:
    """'sha256:<hex>' of the file's bytes, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


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


# ---------------------------------------------------------------------------------------------
# the repository


@dataclass(slots=True)
class ScanResult:
    """What `ModelRepository.scan` found: valid configs (sorted) and broken entries."""

    models: list[ModelConfig] = field(default_factory=list)
    broken: dict[Path, str] = field(default_factory=dict)
    """Folder or file -> why it was skipped."""


class ModelRepository:
    """A model repository rooted at `root`. Reads the disk on every call (no cache), so
    models written or removed while the agent runs are seen at the next call.

    Containment: every path handed out (version folder, model.yaml, artifact) is resolved
    (symlinks followed, `..` gone) and must lie inside `root`; a model.yaml or an artifact
    that resolves outside is `ModelUnavailable`, naming the model and the file relative to its
    version folder, never a path on disk (error messages reach HTTP callers)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self._parsed: dict[Path, tuple[tuple[int, int], ModelConfig]] = {}
        """model.yaml path -> ((mtime_ns, size) when parsed, config): `config` re-reads a file
        only when it changed (the engine and the SLA monitor ask every few seconds)."""
        self._hashed: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
        """artifact (resolved) -> ((device, inode, mtime_ns, size) when hashed, its digest): a
        digest mismatch stays known (`problem`) until the file changes or is hashed again."""

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------

    def version_dir(self, model_id: ModelId) -> Path:
        """`<root>/<name>/<version>`, validated; raises `InvalidModel` for a bad name or a
        path that resolves outside the repository (e.g. through a symlink)."""
        validate_name(model_id.name)
        validate_version(model_id.version)
        path = (self.root / model_id.name / model_id.version).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidModel(
                f"{model_id}: {model_id.name}/{model_id.version} resolves outside the repository"
            )
        return path

    def artifact_path(self, config: ModelConfig) -> Path:
        """The artifact file of `config`, resolved; `ModelUnavailable` when it lies outside
        the repository."""
        vdir = self.version_dir(config.id)
        return self._contained(config.id, vdir / config.artifact, f"artifact {config.artifact!r}")

    def _contained(self, model_id: ModelId, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelUnavailable(
                f"model {model_id}: {what} resolves outside the model repository (a symlink "
                "escape); not serving it"
            )
        return resolved

    def readable(self) -> str | None:
        """None when the root can be listed, else why not (for readiness; a few syscalls)."""
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
        except OSError as e:
            return f"model repository cannot be read ({e.strerror or type(e).__name__})"
        return None

    def remove_temp_files(self) -> list[Path]:
        """Remove the temp files (`.<name>.*.tmp`) that a process killed mid-write left in version
        folders (downloads, copies, model.yaml writes: every writer renames a complete, verified
        temp file into place, so a temp file is never anything but garbage). Call at start,
        before anything writes. Returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for version_dir in self.root.glob("*/*"):
            if not version_dir.is_dir() or version_dir.is_symlink():
                continue
            for tmp in version_dir.glob(".*.tmp"):
                try:
                    if stat.S_ISREG(tmp.lstat().st_mode):
                        tmp.unlink()
                        removed.append(tmp)
                except OSError as e:
                    log.warning("model repository: cannot remove temp file %s: %s", tmp, e)
        for tmp in removed:
            log.warning("model repository: removed %s, left by an interrupted write", tmp)
        return removed

    # -- lookups ----------------------------------------------------------------------------

    def scan(self) -> ScanResult:
        """Every model version on disk; broken entries are reported, never raised."""
        result = ScanResult()
        if not self.root.is_dir():
            result.broken[self.root] = "repository root is not a directory"
            return result
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if version_dir.name.startswith(".") or not version_dir.is_dir():
                    continue
                try:
                    result.models.append(self.config(model_dir.name, version_dir.name))
                except (InvalidModel, ModelNotFound) as e:
                    result.broken[version_dir] = str(e)
        result.models.sort(key=lambda c: (c.name, version_sort_key(c.version)))
        return result

    def index(self) -> list[ModelConfig]:
        """Valid model versions, sorted by name then version; broken ones are logged."""
        result = self.scan()
        for path, why in result.broken.items():
            log.warning("model repository: skipping %s: %s", path, why)
        return result.models

    def versions(self, name: str) -> list[str]:
        """Version folders (with a model.yaml) of model `name`, oldest first."""
        try:
            validate_name(name)
        except InvalidModel as e:
            raise ModelNotFound(str(e)) from None
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"no model named {name!r} in the repository")
        found = [
            d.name
            for d in model_dir.iterdir()
            if d.is_dir() and VERSION_RE.match(d.name) and (d / CONFIG_FILE).is_file()
        ]
        return sorted(found, key=version_sort_key)

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        """The config of `name` at `version` (None: the newest version).

        Raises `ModelNotFound` when there is no such model or version (or the name cannot
        be one), `ModelUnavailable` when its model.yaml or artifact resolves outside the
        repository, `InvalidModel` when its model.yaml is broken.
        """
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise ModelNotFound(f"model {name!r} has no versions in the repository")
            version = versions[-1]
        model_id = ModelId(name, version)
        try:
            vdir = self.version_dir(model_id)
        except InvalidModel as e:
            raise ModelNotFound(str(e)) from None
        path = vdir / CONFIG_FILE
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ModelNotFound(
                f"no model {name}:{version} in the repository (no {name}/{version}/{CONFIG_FILE})"
            )
        path = self._contained(model_id, path, CONFIG_FILE)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == stamp:
            config = cached[1]
        else:
            config = parse_model_config(path, source=f"{name}/{version}/{CONFIG_FILE}")
            self._parsed[path] = (stamp, config)
        if (config.name, config.version) != (name, version):
            raise InvalidModel(
                f"{name}/{version}/{CONFIG_FILE}: declares {config.name}:{config.version} but lies "
                f"in the folder of {name}:{version}; the folder names must match 'name' and 'version'"
            )
        self.artifact_path(config)
        return config

    # -- artifacts --------------------------------------------------------------------------

    def verify_digest(self, config: ModelConfig) -> None:
        """Hash the artifact (streamed, every time: file timestamps are too coarse to trust a
        cached hash before a load); raise `DigestMismatch` unless it is `config.digest`. The
        result is remembered for `problem`."""
        path = self.artifact_path(config)
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise InvalidModel(f"{config.id}: artifact {config.artifact!r} is missing")
        actual = sha256_file(path)
        self._hashed[path] = ((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), actual)
        if actual != config.digest:
            raise DigestMismatch(_mismatch(config, actual))

    def problem(self, config: ModelConfig) -> str | None:
        """Why `config` cannot be served as its files stand, without reading them: its
        artifact resolves outside the repository or is missing, or its last hash (while the
        file is unchanged) did not match the digest. None: no problem known. Cheap (a few
        syscalls), for the index and readiness."""
        try:
            path = self.artifact_path(config)
            st = path.stat()
        except InvalidModel as e:
            return str(e)
        except OSError:
            return f"{config.id}: artifact {config.artifact!r} is missing"
        cached = self._hashed.get(path)
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if cached is not None and cached[0] == stamp and cached[1] != config.digest:
            return _mismatch(config, cached[1])
        return None

    def load(self, config: ModelConfig, device: str) -> Backend:
        """Verify the digest, then load with the backend for `config.format` onto `device`."""
        self.verify_digest(config)
        backend = backend_for(config.format)
        log.debug("loading %s (%s) on %s", config.id, config.format, device)
        return backend.load(config, self.version_dir(config.id), device)


def _mismatch(config: ModelConfig, actual: str) -> str:
    return (
        f"{config.id}: artifact {config.artifact!r} has digest {actual} but {config.digest} was "
        "expected; refusing to load it"
    )
