"""The model repository on disk: `<root>/<model>/<version>/model.yaml` plus the artifact.

Layout and invariants:
- one folder per model, one sub-folder per version; the folder names ARE the model's
  name and version, and model.yaml must repeat them (a mismatch is an `InvalidModel`);
- model names and versions are valid (`model_names`: a DNS label, as in the CRDs);
  every path the repository hands out resolves inside `root` (symlinks included);
- `model.yaml` is parsed strictly (`model_yaml`), its errors naming the file relative to the
  root and the field, never a path on disk nor a stack trace;
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
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet_api.types import ModelId
from node_agent.errors import DigestMismatch, InvalidModel, ModelNotFound, ModelUnavailable
from node_agent.runtime.backends import backend_for
from node_agent.runtime.model_names import VERSION_RE, validate_name, validate_version, version_sort_key
from node_agent.runtime.model_yaml import CONFIG_FILE, parse_model_config
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path | str) -> str:
    """'sha256:<hex>' of the file's bytes, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


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
