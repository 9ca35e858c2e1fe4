"""`oci://` artifacts: a model pushed to an OCI registry as an ORAS-style artifact (a manifest
whose layers are the model's files), pulled through the registry HTTP API v2.

    oci://<registry>[:port]/<repository>@sha256:<manifest digest>

Only a digest reference is admitted (a tag can be moved; a digest names one manifest). The
manifest is fetched by that digest and verified against it; it must list a layer whose digest
is the spec's artifact digest and one whose digest is its `configDigest` (the model.yaml).
Blobs are fetched by digest (`GET /v2/<repository>/blobs/<digest>`: plain HTTP, so the
downloader's Range resume, retries, bandwidth limit and peer fetch apply unchanged). The file
name of the artifact is its layer's `org.opencontainers.image.title` annotation (ORAS sets it),
else the format's default.

A Hugging Face checkpoint folder (`format: huggingface`) is one manifest whose layers are the
folder's files, each titled with its path in the folder, as `oras push` of those files makes
it: the artifact is the `SHA256SUMS` layer, and every file that manifest lists is the layer
with that title (`Registry.listed_blobs`), whose digest must be the one its line gives.

A manifest is refused whole (`InvalidModel`) when a title is not a relative path inside the
folder (absolute, `..`, `.` or empty parts, a backslash, control characters), two layers share
a title, a layer's size is not a count of bytes, or it has more than `MAX_LAYERS` layers; a
blob is never read past the size its layer declares (`download.Delivery.fetch`'s `size_bytes`).

Registries are spoken to over https, except `localhost` and `127.0.0.1` (plain http, as
container tools do for a local registry). Anonymous pulls that need a token (the Docker
registry token flow: 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`) get
one from the realm; no credentials are sent. The token is renewed before each blob once its
`expires_in` is nearly over, so pulling a checkpoint's many files outlasts it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from node_agent import __version__
from node_agent.errors import DigestMismatch, InvalidModel

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
TITLE = "org.opencontainers.image.title"
_REFERENCE = re.compile(
    r"^oci://(?P<registry>[A-Za-z0-9.-]+(:[0-9]+)?)/(?P<repository>[a-z0-9]+([._/-][a-z0-9]+)*)"
    r"@(?P<digest>sha256:[a-f0-9]{64})$"
)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_MANIFEST_BYTES = 4 << 20
_MAX_TITLE_CHARS = 1024
MAX_LAYERS = 4096
"""Layers a manifest may have: a checkpoint of hundreds of shards fits; thousands are not a model."""


@dataclass(frozen=True, slots=True)
class OciReference:
    registry: str
    repository: str
    digest: str

    @property
    def base(self) -> str:
        host = self.registry.rsplit(":", 1)[0]
        scheme = "http" if host in ("localhost", "127.0.0.1") else "https"
        return f"{scheme}://{self.registry}/v2/{self.repository}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/blobs/{digest}"


def parse_oci(uri: str) -> OciReference:
    """`oci://registry/repository@sha256:<hex>` -> reference; InvalidModel otherwise."""
    m = _REFERENCE.match(uri)
    if m is None:
        raise InvalidModel(
            f"artifact URI {uri!r}: expected oci://<registry>/<repository>@sha256:<64 hex> "
            "(a digest reference: tags are refused)"
        )
    return OciReference(m.group("registry"), m.group("repository"), m.group("digest"))


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of a verified manifest: its blob's digest, the size in bytes the manifest
    declares for it, and its title (a relative path inside the artifact's folder; "" if none)."""

    digest: str
    size_bytes: int
    title: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest that hashed to the digest it was fetched by. Invariants (`parse_manifest`):
    at most `MAX_LAYERS` layers, every title a safe relative path, no two layers titled alike."""

    digest: str
    layers: tuple[Layer, ...]

    def layer(self, digest: str) -> Layer | None:
        """The first layer whose blob has `digest` (identical files share one)."""
        return next((layer for layer in self.layers if layer.digest == digest), None)

    def titled(self) -> dict[str, Layer]:
        return {layer.title: layer for layer in self.layers if layer.title}


@dataclass(frozen=True, slots=True)
class Pull:
    """What to fetch for one model: the artifact blob (saved as `file_name`, `size_bytes` long)
    and the model.yaml blob, with the headers the registry wants on each request."""

    artifact_url: str
    config_url: str
    file_name: str
    headers: dict[str, str]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Blob:
    """A file of a checkpoint folder to fetch: its blob's URL, digest and declared size."""

    url: str
    digest: str
    size_bytes: int


class Registry:
    """One registry repository, for one pull (its token, if it needs one, is kept here)."""

    def __init__(
        self, ref: OciReference, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ref, self.timeout_s, self._clock = ref, timeout_s, clock
        self.headers: dict[str, str] = {"User-Agent": f"edgefleet-agent/{__version__}"}
        self._challenge = ""
        """The Bearer challenge the registry answered with ("" until it asks for a token)."""
        self._token_until_s = 0.0
        """When the token is to be renewed (the clock's seconds)."""
        self._manifest: Manifest | None = None

    def manifest(self, label: str) -> Manifest:
        """The reference's manifest, fetched once, verified against its digest and checked
        (`parse_manifest`); InvalidModel / DigestMismatch."""
        if self._manifest is None:
            url = f"{self.ref.base}/manifests/{self.ref.digest}"
            data = self._get(url, {"Accept": ", ".join(MANIFEST_TYPES)}, label)
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != self.ref.digest:
                raise DigestMismatch(f"{label}: the manifest at {url} has digest {actual}; refusing it")
            self._manifest = parse_manifest(data, self.ref.digest, label)
        return self._manifest

    def pull(self, artifact_digest: str, config_digest: str, default_name: str, label: str) -> Pull:
        """The manifest, verified, and what to fetch from it; InvalidModel / DigestMismatch."""
        manifest = self.manifest(label)
        for what, digest in (("artifact", artifact_digest), ("configDigest (model.yaml)", config_digest)):
            if manifest.layer(digest) is None:
                raise InvalidModel(
                    f"{label}: the manifest {self.ref.digest} lists no layer {digest} (the {what})"
                )
        artifact = manifest.layer(artifact_digest)
        assert artifact is not None
        title = artifact.title or default_name
        if not _FILE_NAME.match(title) or title == "model.yaml":
            raise InvalidModel(
                f"{label}: the artifact layer's title {title!r} is not a plain file name (run `oras push` "
                "inside the model's folder: it titles each layer with the path it is given)"
            )
        return Pull(
            self.ref.blob_url(artifact_digest),
            self.ref.blob_url(config_digest),
            title,
            dict(self.headers),
            artifact.size_bytes,
        )

    def listed_blobs(self, listed: Sequence[tuple[str, str]], label: str) -> dict[str, Blob]:
        """Relative path -> its blob, for every (digest, path) a checkpoint's `SHA256SUMS`
        lists: the layer titled with that path, whose digest must be the line's. All checked
        before any is fetched: InvalidModel for a path no layer is titled with,
        DigestMismatch for a layer whose digest is not its line's."""
        manifest = self.manifest(label)
        titled = manifest.titled()
        absent = [rel for _, rel in listed if rel not in titled]
        if absent:
            raise InvalidModel(
                f"{label}: SHA256SUMS lists {len(absent)} file(s) the manifest {manifest.digest} has no "
                f"layer titled with ({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}); "
                "push every file it lists, each as its own layer titled with its path "
                "(run `oras push` inside the folder with SHA256SUMS, model.yaml and $(cut -c67- SHA256SUMS))"
            )
        out = {}
        for digest, rel in listed:
            layer = titled[rel]
            if layer.digest != digest:
                raise DigestMismatch(
                    f"{label}: the manifest {manifest.digest}'s layer {rel!r} has digest {layer.digest}, "
                    f"but SHA256SUMS says {digest}; refusing it"
                )
            out[rel] = Blob(self.ref.blob_url(digest), digest, layer.size_bytes)
        return out

    def _get(self, url: str, extra: dict[str, str], label: str, retried: bool = False) -> bytes:
        request = urllib.request.Request(url, headers={**self.headers, **extra})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data: bytes = response.read(_MAX_MANIFEST_BYTES + 1)
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "") if e.code == 401 else ""
            e.close()
            if challenge.lower().startswith("bearer ") and not retried:
                self._authorize(challenge, label)
                return self._get(url, extra, label, retried=True)
            raise InvalidModel(f"{label}: fetching {url} failed: HTTP {e.code} {e.reason}") from None
        except OSError as e:
            raise InvalidModel(f"{label}: fetching {url} failed: {getattr(e, 'reason', e)}") from None
        if len(data) > _MAX_MANIFEST_BYTES:
            raise InvalidModel(f"{label}: {url} is larger than {_MAX_MANIFEST_BYTES} bytes; not a manifest")
        return data

    def fresh_headers(self, label: str) -> dict[str, str]:
        """The headers for the next blob request, the pull token renewed once it is due (its
        `expires_in`, less a margin): a pull of many large files outlasts one token."""
        if self._challenge and self._clock() >= self._token_until_s:
            self._authorize(self._challenge, label)
        return dict(self.headers)

    def _authorize(self, challenge: str, label: str) -> None:
        token, expires_in_s = self._token(challenge, label)
        self.headers["Authorization"] = "Bearer " + token
        self._challenge = challenge
        self._token_until_s = self._clock() + max(expires_in_s * 0.8, expires_in_s - 30)

    def _token(self, challenge: str, label: str) -> tuple[str, float]:
        """An anonymous pull token from the challenge's realm (the Docker registry token flow)
        and its lifetime in seconds (`expires_in`; 60 when the registry does not say, as the
        token spec has it)."""
        params = urllib.request.parse_keqv_list(urllib.request.parse_http_list(challenge[len("bearer ") :]))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise InvalidModel(f"{label}: the registry asks for a token from {realm!r}; not a URL")
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, headers={"User-Agent": self.headers["User-Agent"]})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                doc: Any = json.loads(response.read(1 << 20))
            return str(doc.get("token") or doc["access_token"]), float(doc.get("expires_in") or 60)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidModel(f"{label}: no pull token from {realm}: {e}") from None


def parse_manifest(data: bytes, digest: str, label: str) -> Manifest:
    """An image manifest's layers, checked: InvalidModel for what is not one, more than
    `MAX_LAYERS` layers, a size that is not a count of bytes, an unsafe title (`check_title`),
    or a title two layers share."""
    try:
        raw = json.loads(data)["layers"]
        if not isinstance(raw, list):
            raise TypeError("'layers' is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidModel(f"{label}: the manifest {digest} is not an OCI image manifest: {e!r}") from None
    if len(raw) > MAX_LAYERS:
        raise InvalidModel(
            f"{label}: the manifest {digest} has {len(raw)} layers, more than {MAX_LAYERS}; refusing it"
        )
    try:
        layers = tuple(Layer(str(r["digest"]), r["size"], _title(r)) for r in raw)
    except (KeyError, TypeError) as e:
        raise InvalidModel(
            f"{label}: the manifest {digest} has a layer that is no descriptor: {e!r}"
        ) from None
    seen: set[str] = set()
    for layer in layers:
        if type(layer.size_bytes) is not int or layer.size_bytes < 0:
            raise InvalidModel(
                f"{label}: the manifest {digest}'s layer {layer.digest} has size {layer.size_bytes!r}, "
                "not a count of bytes"
            )
        if not layer.title:
            continue
        check_title(layer.title, f"{label}: the manifest {digest}")
        if layer.title in seen:
            raise InvalidModel(
                f"{label}: the manifest {digest} has two layers titled {layer.title!r}; refusing it"
            )
        seen.add(layer.title)
    return Manifest(digest, layers)


def check_title(title: str, where: str) -> None:
    """InvalidModel unless `title` is a relative POSIX path that stays inside the folder it is
    written to: no absolute path, no `..`, `.` or empty part, no backslash or control character."""
    path = PurePosixPath(title)
    if (
        len(title) > _MAX_TITLE_CHARS
        or not path.parts
        or path.is_absolute()
        or path.as_posix() != title
        or any(part in (".", "..") for part in path.parts)
        or "\\" in title
        or any(ord(c) < 32 or ord(c) == 127 for c in title)
    ):
        raise InvalidModel(
            f"{where} has a layer titled {title!r}, not a relative path inside the artifact's folder; "
            "refusing it"
        )


def _title(layer: Any) -> str:
    annotations = layer.get("annotations") if isinstance(layer, dict) else None
    return str(annotations.get(TITLE) or "") if isinstance(annotations, dict) else ""
