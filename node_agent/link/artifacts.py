"""Artifacts into the model repository: `materialize` resolves a spec entry's artifact URI
(repo://, file://, https://, oci://) into `<model>/<version>`, verified against the spec's
digest (downloads: `download.Delivery`; registries: `oci`; the model.yaml of either verified
against `configDigest`).
Blocking file and network work (the link runs it on its thread pool); `write_atomic` is the
crash-safe file replace the link's persisted assignment uses too."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, suppress
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from edgefleet_api.edge_node import ModelAssignment
from node_agent import __version__
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.link.assignment import ArtifactLocation, effective_config, parse_artifact_uri
from node_agent.link.download import Delivery
from node_agent.link.durable import fsync_dir, write_atomic
from node_agent.link.node_cache import NodeCache
from node_agent.link.oci import Pull, Registry, parse_oci
from node_agent.runtime.backends import default_artifact
from node_agent.runtime.checksums import CHECKSUMS_FILE, parse_checksums
from node_agent.runtime.model_yaml import CONFIG_FILE, parse_model_config, write_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file
from node_agent.types import ModelConfig

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


def materialize(
    repository: ModelRepository,
    entry: ModelAssignment,
    delivery: Delivery | None = None,
    cache: NodeCache | None = None,
) -> ModelConfig:
    """Make the entry's artifact present in `repository` as `<model>/<version>`, verified
    against the spec's digest, and return its effective config. Blocking (copies, hashes).

    With a node `cache`: a blob the cache holds (verified as it is handed out) is placed into
    the version folder from there (a hard link on the same filesystem, else a copy) with the
    model.yaml stored beside it, and the source is not opened; after a copy or download the
    verified artifact and its model.yaml go into the cache. A checkpoint folder's files
    (`MANIFEST_FORMATS`) are placed from the cache and kept in it likewise, each by its digest.

    repo:// inside the version's own folder is used in place (model.yaml is left alone);
    anything else (file://, https://, or repo:// naming another folder) is copied or
    downloaded, through a temp file hashed while it is written: bytes that do not match the
    digest never replace anything, and an artifact already there with the digest is kept.
    The signature comes from the model.yaml next to the source, else the one already in the
    target folder. Raises `UnsupportedArtifact`, `DigestMismatch`, `InvalidModel`, OSError.
    """
    where = parse_artifact_uri(entry.artifact.uri)
    target_dir = repository.version_dir(entry.id)
    in_place = where.scheme == "repo" and _inside(repository.root / where.path, target_dir)
    if cache is not None and not in_place:
        cached = _from_cache(cache, entry, target_dir)
        if cached is not None:
            manifest = repository.artifact_path(cached)
            if cached.format in MANIFEST_FORMATS:
                _complete_listed_files(repository, entry, manifest, where, delivery, cache)
            return cached
    config = _materialize(repository, entry, where, target_dir, delivery)
    if config.format in MANIFEST_FORMATS:
        _complete_listed_files(repository, entry, repository.artifact_path(config), where, delivery, cache)
    if cache is not None:
        try:
            text = (target_dir / CONFIG_FILE).read_text(encoding="utf-8")
            cache.put(repository.artifact_path(config), entry.artifact.digest, text, _config_digest_of(entry))
        except (OSError, ValueError) as e:  # the version is in place all the same
            log.warning("%s: not kept in the node cache: %s", entry.id, e)
    return config


def _inside(path: Path, folder: Path) -> bool:
    resolved = path.resolve()
    return resolved == folder or resolved.is_relative_to(folder)


def _config_digest_of(entry: ModelAssignment) -> str | None:
    """The spec's digest of the artifact's model.yaml (`configDigest`), if it gives one."""
    return entry.artifact.config_digest


def _from_cache(cache: NodeCache, entry: ModelAssignment, target_dir: Path) -> ModelConfig | None:
    """The entry's version placed from the node cache, or None when the cache lacks the blob or
    its model.yaml for the entry's config digest (or the blob failed its check). A fetched
    artifact (https, oci) without a configDigest is never placed from the cache: its model.yaml
    would be one no digest covers."""
    if (
        parse_artifact_uri(entry.artifact.uri).scheme in ("https", "http", "oci")
        and not entry.artifact.config_digest
    ):
        return None
    meta = cache.meta_path(entry.artifact.digest, _config_digest_of(entry))
    if not (meta.is_file() and cache.has(entry.artifact.digest)):
        return None
    try:
        base = parse_model_config(meta)
    except InvalidModel as e:
        log.warning("%s: the node cache's model.yaml is unusable (%s); fetching again", entry.id, e)
        return None
    name = PurePosixPath(base.artifact).name
    if not cache.place(entry.artifact.digest, target_dir / name):
        return None
    config = effective_config(dataclasses.replace(base, artifact=name), entry)
    write_model_config(target_dir, config)
    log.info("%s: placed %s from the node cache", entry.id, entry.artifact.digest)
    return config


MANIFEST_FORMATS = ("huggingface",)
"""Formats whose artifact is a `SHA256SUMS` manifest of the files beside it (a checkpoint folder)."""


def _complete_listed_files(
    repository: ModelRepository,
    entry: ModelAssignment,
    manifest: Path,
    where: ArtifactLocation,
    delivery: Delivery | None,
    cache: NodeCache | None = None,
) -> None:
    """Every file the verified `manifest` lists, beside it, each verified by its own line:
    kept when already there, else placed from the node `cache`, else fetched from its source
    (`_fetch_listed`); no source is contacted when none is missing. With a `cache`, every
    listed file then goes into it too (a hard link), as the artifact does. A file that does
    not verify never takes its name."""
    folder = manifest.parent
    listed = parse_checksums(manifest.read_text(encoding="utf-8"))
    missing = [(digest, rel) for digest, rel in listed if not _holds(folder / rel, digest)]
    if cache is not None:
        missing = [(digest, rel) for digest, rel in missing if not cache.place(digest, folder / rel)]
    if missing:
        _fetch_listed(repository, entry, folder, listed, missing, where, delivery or DEFAULT_DELIVERY)
    if cache is not None:
        try:
            for digest, rel in listed:
                cache.put(folder / rel, digest)
        except (OSError, ValueError) as e:  # the version is in place all the same
            log.warning("%s: its files not kept in the node cache: %s", entry.id, e)


def _fetch_listed(
    repository: ModelRepository,
    entry: ModelAssignment,
    folder: Path,
    listed: list[tuple[str, str]],
    missing: list[tuple[str, str]],
    where: ArtifactLocation,
    delivery: Delivery,
) -> None:
    """The `missing` files of a checkpoint folder from beside the artifact's URL (https,
    through `delivery`: resumed, paced, peers first), as the registry manifest's layer titled
    with its path (oci: the same delivery, each blob by its digest and no longer than its layer
    says; the whole listing checked against the manifest first), or copied from beside its path
    (file, repo)."""
    if where.scheme == "oci":
        registry = Registry(parse_oci(where.path), DEFAULT_DELIVERY.settings.read_timeout_s)
        blobs = registry.listed_blobs(listed, str(entry.id))  # all checked before any byte moves
        for digest, rel in missing:
            blob = blobs[rel]
            headers = registry.fresh_headers(str(entry.id))
            delivery.fetch(blob.url, folder / rel, digest, f"{entry.id} {rel}", headers, blob.size_bytes)
        return
    for digest, rel in missing:
        target = folder / rel
        label = f"{entry.id} {rel}"
        if where.scheme in ("https", "http"):
            delivery.fetch(urljoin(where.path, quote(rel)), target, digest, label=label)
        elif where.scheme in ("file", "repo"):
            root = repository.root if where.scheme == "repo" else Path("/")
            source = (root / where.path.lstrip("/")).resolve().parent / rel
            part = dataclasses.replace(entry, artifact=dataclasses.replace(entry.artifact, digest=digest))
            _copy_verified(source, target, part)
        else:
            raise InvalidModel(
                f"{entry.id}: the files a {CHECKSUMS_FILE} manifest lists cannot be fetched over "
                f"{where.scheme}:// (use https://, oci://, file:// or a repo:// folder)"
            )


def _holds(path: Path, digest: str) -> bool:
    return path.is_file() and sha256_file(path) == digest


def prepared_file(artifact: Path, artifact_digest: str, fmt: str, digest: str) -> Path | None:
    """The file with bytes `digest` of a prepared version (its `artifact`, verified against
    `artifact_digest`), for peers: the artifact itself, or for a checkpoint folder
    (`MANIFEST_FORMATS`) a file its `SHA256SUMS` lists with that digest (each verified by its
    line when the version was prepared); None when the version holds none."""
    if digest == artifact_digest:
        return artifact if artifact.is_file() else None
    if fmt not in MANIFEST_FORMATS:
        return None
    try:
        listed = parse_checksums(artifact.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, InvalidModel):
        return None
    path = next((artifact.parent / rel for d, rel in listed if d == digest), None)
    return path if path is not None and path.is_file() else None


def _materialize(
    repository: ModelRepository,
    entry: ModelAssignment,
    where: ArtifactLocation,
    target_dir: Path,
    delivery: Delivery | None,
) -> ModelConfig:
    """`materialize` from the artifact's source (the cache left aside)."""
    if where.scheme in ("https", "http"):
        return _download(repository, entry, where.path, target_dir, delivery or DEFAULT_DELIVERY)
    if where.scheme == "oci":
        return _pull(repository, entry, where.path, target_dir, delivery or DEFAULT_DELIVERY)
    if where.scheme == "repo":
        source = (repository.root / where.path).resolve()
        if not source.is_relative_to(repository.root):
            raise InvalidModel(f"{entry.id}: {entry.artifact.uri} resolves outside the model repository")
    else:
        source = Path(where.path).resolve()
    if not source.exists():
        raise InvalidModel(f"{entry.id}: artifact {entry.artifact.uri} not found ({source})")
    if source == target_dir or (source.is_file() and source.is_relative_to(target_dir)):
        base = _base_config((target_dir,), entry)
        artifact = source if source.is_file() else target_dir / base.artifact
        if not artifact.is_file():
            raise InvalidModel(f"{entry.id}: artifact {artifact} is missing")
        actual = sha256_file(artifact)
        if actual != entry.artifact.digest:
            raise DigestMismatch(_mismatch(entry, actual))
        name = artifact.relative_to(target_dir).as_posix()
        config = effective_config(dataclasses.replace(base, artifact=name), entry)
    else:
        source_dir = source if source.is_dir() else source.parent
        base = _base_config((source_dir, target_dir), entry)
        name = source.name if source.is_file() else base.artifact
        _copy_verified(source_dir / name, target_dir / Path(name).name, entry)
        config = effective_config(dataclasses.replace(base, artifact=Path(name).name), entry)
        write_model_config(target_dir, config)
    repository.artifact_path(config)  # the artifact stays inside its version folder
    return config


DEFAULT_DELIVERY = Delivery()
"""Used where no agent passes its own (no peers, no bandwidth limit, the default retries)."""


def _download(
    repository: ModelRepository,
    entry: ModelAssignment,
    url: str,
    target_dir: Path,
    delivery: Delivery,
    pull: Pull | None = None,
) -> ModelConfig:
    """https:// (or http://): the artifact (`download.Delivery`: from the site's peers, else
    the origin; resumed after a cut; verified while it streams in) and the model.yaml beside
    it (same URL folder), which must hash to the spec's `configDigest`: a model.yaml that no
    digest covers is never loaded. `pull`: an oci:// artifact's blobs instead (`oci`)."""
    name = pull.file_name if pull else PurePosixPath(urlsplit(url).path).name
    headers = pull.headers if pull else None
    config_file = target_dir / CONFIG_FILE
    config_digest = None if config_file.is_file() else _config_digest(entry)  # refused before any byte
    target = target_dir / name
    if not (target.is_file() and sha256_file(target) == entry.artifact.digest):
        size = pull.size_bytes if pull else None
        delivery.fetch(url, target, entry.artifact.digest, str(entry.id), headers, size)
    if config_digest is not None:
        config_url = pull.config_url if pull else urljoin(url, CONFIG_FILE)
        write_atomic(config_file, _fetch_config(config_url, entry, config_digest, headers))
    try:
        base = parse_model_config(config_file)
    except InvalidModel as e:
        config_file.unlink(missing_ok=True)  # fetched again next time
        raise InvalidModel(f"{entry.id}: the {CONFIG_FILE} beside {url} is invalid: {e}") from None
    config = effective_config(dataclasses.replace(base, artifact=name), entry)
    write_model_config(target_dir, config)
    repository.artifact_path(config)
    return config


def _pull(
    repository: ModelRepository, entry: ModelAssignment, uri: str, target_dir: Path, delivery: Delivery
) -> ModelConfig:
    """oci://: the manifest by its digest, then the artifact and model.yaml blobs by theirs
    (`oci`). A version folder that already holds the verified artifact its model.yaml names
    needs no registry (an agent restarted offline serves it)."""
    config_file = target_dir / CONFIG_FILE
    if config_file.is_file():
        with suppress(InvalidModel):
            base = parse_model_config(config_file)
            artifact = target_dir / base.artifact
            if artifact.parent == target_dir and sha256_file(artifact) == entry.artifact.digest:
                config = effective_config(base, entry)
                repository.artifact_path(config)
                return config
    config_digest = _config_digest(entry)
    registry = Registry(parse_oci(uri), DEFAULT_DELIVERY.settings.read_timeout_s)
    pull = registry.pull(entry.artifact.digest, config_digest, default_artifact(entry.format), str(entry.id))
    config_file.unlink(missing_ok=True)  # taken from the registry, verified, with the artifact
    return _download(repository, entry, pull.artifact_url, target_dir, delivery, pull)


def _config_digest(entry: ModelAssignment) -> str:
    if entry.artifact.config_digest is None:
        raise InvalidModel(
            f"{entry.id}: {entry.artifact.uri} is a download, but its artifact gives no configDigest: "
            f"the agent loads no {CONFIG_FILE} that a digest does not cover"
        )
    return entry.artifact.config_digest


def _fetch_config(
    url: str,
    entry: ModelAssignment,
    digest: str,
    headers: Mapping[str, str] | None = None,
    limit_bytes: int = 1 << 20,
) -> str:
    """The model.yaml at `url`, verified against `digest`."""
    request = urllib.request.Request(
        url, headers={"User-Agent": f"edgefleet-agent/{__version__}", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=DEFAULT_DELIVERY.settings.read_timeout_s) as response:
            data = response.read(limit_bytes + 1)
    except urllib.error.HTTPError as e:
        raise InvalidModel(f"{entry.id}: fetching {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise InvalidModel(f"{entry.id}: fetching {url} failed: {reason}") from None
    if len(data) > limit_bytes:
        raise InvalidModel(f"{entry.id}: {url} is larger than {limit_bytes} bytes; not a {CONFIG_FILE}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(
            f"{entry.id}: {url} has digest {actual}, but the EdgeNode spec's configDigest is {digest}; "
            "refusing to load it"
        )
    return data.decode("utf-8")


def _base_config(folders: tuple[Path, ...], entry: ModelAssignment) -> ModelConfig:
    for folder in folders:
        if (folder / CONFIG_FILE).is_file():
            return parse_model_config(folder / CONFIG_FILE)
    raise InvalidModel(
        f"{entry.id}: no {CONFIG_FILE} next to {entry.artifact.uri} (nor in {folders[-1]}); "
        "the agent needs the model's inputs and outputs"
    )


def _mismatch(entry: ModelAssignment, actual: str) -> str:
    return (
        f"{entry.id}: artifact {entry.artifact.uri} has digest {actual}, but the EdgeNode spec "
        f"requires {entry.artifact.digest}; refusing to load it"
    )


def _copy_verified(source: Path, target: Path, entry: ModelAssignment) -> None:
    if not source.is_file():
        raise InvalidModel(f"{entry.id}: artifact {source} is not a file")
    _store_verified(lambda: source.open("rb"), target, entry, str(source))


def _store_verified(
    open_source: Callable[[], AbstractContextManager[BinaryIO]],
    target: Path,
    entry: ModelAssignment,
    source: str,
) -> None:
    """The bytes of `open_source()` into `target` through a temp file hashed as it is written:
    bytes that do not match the entry's digest never replace anything. A `target` that
    already has the digest is kept and the source not opened.

    Crash safety: the temp file (`.<name>.*.tmp`, in the target's folder, so the rename is
    atomic) is fsynced, verified, then renamed, and the folder fsynced; a process killed
    before the rename leaves only the temp file, which the repository removes at the next
    start (`ModelRepository.remove_temp_files`): a partial file never has the artifact's name."""
    if target.is_file() and sha256_file(target) == entry.artifact.digest:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with open_source() as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            short = getattr(src, "length", None)  # an HTTP response: bytes still due
            if isinstance(short, int) and short > 0:
                raise InvalidModel(
                    f"{entry.id}: fetching {source} failed: the transfer stopped {short} bytes short"
                )
            out.flush()
            os.fsync(out.fileno())
        actual = "sha256:" + digest.hexdigest()
        if actual != entry.artifact.digest:
            raise DigestMismatch(_mismatch(entry, actual))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    log.info("stored %s -> %s", source, target)
