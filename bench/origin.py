"""A loopback HTTP origin for delivery benchmarks and tests: serves byte strings by path, with
Range (206 + Content-Range), a strong ETag and If-Range, and the faults a test controls: a
shared rate limit (the uplink), cuts after a given number of body bytes, Range ignored,
corrupt bytes. Counts what it sent. No traffic leaves 127.0.0.1.

With `token` set and the paths of `registry_paths` it is an OCI registry (the distribution
API's pull side: `/v2/<repository>/manifests/<digest>`, `/v2/<repository>/blobs/<digest>`,
anonymous Bearer tokens) holding what `oras push` stores (`oras_manifest`).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from node_agent.link.download import TokenBucket

_RANGE = re.compile(r"^bytes=(\d+)-$")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
ORAS_FILE_LAYER = "application/vnd.oci.image.layer.v1.tar"
"""The media type `oras push` gives a file layer when none is named (`file:type` names one)."""
TITLE = "org.opencontainers.image.title"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oras_manifest(
    files: Sequence[tuple[str, bytes]], artifact_type: str = "application/vnd.edgefleet.model"
) -> dict[str, Any]:
    """The image manifest `oras push --artifact-type <type> <ref> <path>...` (ORAS 1.1+) writes
    for `files` ((path as given, bytes), in order): the empty config, and one layer per file,
    annotated with its path as its title."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(b"{}"), "size": 2, "data": "e30="},
        "layers": [
            {"mediaType": ORAS_FILE_LAYER, "digest": sha256_digest(data), "size": len(data),
             "annotations": {TITLE: title}}
            for title, data in files
        ],
        "annotations": {"org.opencontainers.image.created": "2026-12-07T00:00:00Z"},
    }  # fmt: skip


def registry_paths(
    repository: str, manifest: Mapping[str, Any], blobs: Iterable[bytes]
) -> tuple[dict[str, bytes], str]:
    """The origin paths a registry serves `manifest` and `blobs` (and the empty config) at, for
    pulls by digest, and the manifest's digest (what `oras push` prints as `Digest:`)."""
    body = json.dumps(manifest).encode()
    base = f"v2/{repository}"
    paths = {f"{base}/blobs/{sha256_digest(data)}": data for data in (b"{}", *blobs)}
    paths[f"{base}/manifests/{sha256_digest(body)}"] = body
    return paths, sha256_digest(body)


@dataclass(slots=True)
class OriginLog:
    """What the origin did: body bytes sent, and each GET's (path, Range header, status)."""

    sent_bytes: int = 0
    sent_by_path: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Origin:
    """`files`: path -> bytes. Faults, settable at any time: `cuts` (a list; each response
    takes the first and closes the connection after that many body bytes; `cut_only`: only
    responses for that path), `ignore_range` (answer 200 with everything), `corrupt` (flip a
    byte in every body), `rate_bytes_per_s` (all responses together; 0: none)."""

    def __init__(self, files: Mapping[str, bytes], rate_bytes_per_s: int = 0) -> None:
        self.files = dict(files)
        self.cuts: list[int] = []
        self.cut_only: str | None = None
        """When set, only responses for this path take cuts."""
        self.ignore_range = False
        self.corrupt = False
        self.token: str | None = None
        """When set, every path but `token` needs `Authorization: Bearer <token>` (401 with a
        Bearer challenge whose realm is `<base>/token`, which hands it out)."""
        self.token_expires_in: int | None = None
        """The token's lifetime the `token` answer states (`expires_in`, seconds), if set."""
        self.log = OriginLog()
        self.bucket = TokenBucket(rate_bytes_per_s, 64 * 1024) if rate_bytes_per_s else None
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                origin._serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path.lstrip("/")
        range_ = h.headers.get("Range")
        if self.token is not None:  # a registry's anonymous token flow
            if path == "token":
                lifetime = {} if self.token_expires_in is None else {"expires_in": self.token_expires_in}
                self.files["token"] = json.dumps({"token": self.token, **lifetime}).encode()
            elif h.headers.get("Authorization") != f"Bearer {self.token}":
                self._record(path, range_, 401)
                h.send_response(401)
                h.send_header(
                    "WWW-Authenticate", f'Bearer realm="{self.base}/token",service="origin",scope="pull"'
                )
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        data = self.files.get(path)
        if data is None:
            self._record(path, range_, 404)
            h.send_error(404)
            return
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        start = 0
        m = _RANGE.match(range_ or "")
        if_range = h.headers.get("If-Range")
        if m and not self.ignore_range and (if_range is None or if_range == etag):
            start = int(m.group(1))
            if start >= len(data):
                self._record(path, range_, 416)
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        if self.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        status = 206 if start else 200
        self._record(path, range_, status)
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        cut = self.cuts.pop(0) if self.cuts and self.cut_only in (None, path) else None
        limit = len(body) if cut is None else min(cut, len(body))
        sent = 0
        try:
            while sent < limit:
                chunk = body[sent : min(limit, sent + 64 * 1024)]
                if self.bucket is not None:
                    wait_s = self.bucket.take(len(chunk), time.monotonic())
                    if wait_s > 0:
                        time.sleep(wait_s)  # the simulated uplink's pace
                h.wfile.write(chunk)
                sent += len(chunk)
                with self.log.lock:
                    self.log.sent_bytes += len(chunk)
                    self.log.sent_by_path[path] = self.log.sent_by_path.get(path, 0) + len(chunk)
            h.wfile.flush()
        except OSError:
            return  # the client went away
        if cut is not None:
            h.close_connection = True

    def _record(self, path: str, range_: str | None, status: int) -> None:
        with self.log.lock:
            self.log.requests.append((path, range_, status))
