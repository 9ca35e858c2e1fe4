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

Registries are spoken to over https, except `localhost` and `127.0.0.1` (plain http, as
container tools do for a local registry). Anonymous pulls that need a token (the Docker
registry token flow: 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`) get
one from the realm; no credentials are sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
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
class Pull:
    """What to fetch for one model: the artifact blob (saved as `file_name`) and the model.yaml
    blob, with the headers the registry wants on each request."""

    artifact_url: str
    config_url: str
    file_name: str
    headers: dict[str, str]


class Registry:
    """One registry repository, for one pull (its token, if it needs one, is kept here)."""

    def __init__(self, ref: OciReference, timeout_s: float) -> None:
        self.ref, self.timeout_s = ref, timeout_s
        self.headers: dict[str, str] = {"User-Agent": f"edgefleet-agent/{__version__}"}

    def pull(self, artifact_digest: str, config_digest: str, default_name: str, label: str) -> Pull:
        """The manifest, verified, and what to fetch from it; InvalidModel / DigestMismatch."""
        url = f"{self.ref.base}/manifests/{self.ref.digest}"
        data = self._get(url, {"Accept": ", ".join(MANIFEST_TYPES)}, label)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != self.ref.digest:
            raise DigestMismatch(f"{label}: the manifest at {url} has digest {actual}; refusing it")
        try:
            manifest = json.loads(data)
            layers = {str(layer["digest"]): layer for layer in manifest["layers"]}
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidModel(f"{label}: {url} is not an OCI image manifest: {e}") from None
        for what, digest in (("artifact", artifact_digest), ("configDigest (model.yaml)", config_digest)):
            if digest not in layers:
                raise InvalidModel(
                    f"{label}: the manifest {self.ref.digest} lists no layer {digest} (the {what})"
                )
        title = _title(layers[artifact_digest]) or default_name
        if not _FILE_NAME.match(title) or title == "model.yaml":
            raise InvalidModel(f"{label}: the artifact layer's title {title!r} is not a plain file name")
        return Pull(
            self.ref.blob_url(artifact_digest), self.ref.blob_url(config_digest), title, dict(self.headers)
        )

    def _get(self, url: str, extra: dict[str, str], label: str, retried: bool = False) -> bytes:
        request = urllib.request.Request(url, headers={**self.headers, **extra})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data: bytes = response.read(_MAX_MANIFEST_BYTES + 1)
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "") if e.code == 401 else ""
            e.close()
            if challenge.lower().startswith("bearer ") and not retried:
                self.headers["Authorization"] = "Bearer " + self._token(challenge, label)
                return self._get(url, extra, label, retried=True)
            raise InvalidModel(f"{label}: fetching {url} failed: HTTP {e.code} {e.reason}") from None
        except OSError as e:
            raise InvalidModel(f"{label}: fetching {url} failed: {getattr(e, 'reason', e)}") from None
        if len(data) > _MAX_MANIFEST_BYTES:
            raise InvalidModel(f"{label}: {url} is larger than {_MAX_MANIFEST_BYTES} bytes; not a manifest")
        return data

    def _token(self, challenge: str, label: str) -> str:
        """An anonymous pull token from the challenge's realm (the Docker registry token flow)."""
        params = urllib.request.parse_keqv_list(urllib.request.parse_http_list(challenge[len("bearer ") :]))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise InvalidModel(f"{label}: the registry asks for a token from {realm!r}; not a URL")
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, headers={"User-Agent": self.headers["User-Agent"]})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                doc: Any = json.loads(response.read(1 << 20))
            return str(doc.get("token") or doc["access_token"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidModel(f"{label}: no pull token from {realm}: {e}") from None


def _title(layer: Any) -> str:
    annotations = layer.get("annotations") if isinstance(layer, dict) else None
    return str(annotations.get(TITLE) or "") if isinstance(annotations, dict) else ""
