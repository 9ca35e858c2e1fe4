"""An in-memory API server behind a real kubernetes ApiClient, for unit tests of a whole fleet pass.

It stands in for the HTTP layer (`rest_client.request`), so everything above it is the real code:
the client's calls, the reconciler's reads, decisions and writes. It records every request, keeps
objects by URL path, answers lists (with equality label selectors), gets, creates (409 when the
object exists, generateName honoured), JSON merge patches (404 when it is missing; 409 when a
patch names a stale resourceVersion; a status patch writes only status) and deletes. `fail` makes
chosen requests answer an error; `before` runs ahead of every request (to set `urgent` mid-pass).
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client import rest


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any

    @property
    def kind(self) -> str:
        """The resource written, with a subresource: 'edgenodes', 'inferenceservices/status'."""
        plural, _, sub = _parse(self.path)[2:]
        return f"{plural}/{sub}" if sub else plural


class _Response:
    def __init__(self, status: int, data: Any) -> None:
        self.status, self.reason = status, {404: "Not Found", 409: "Conflict"}.get(status, "OK")
        self.data = json.dumps(data).encode()
        self.headers = {"content-type": "application/json"}

    def getheaders(self) -> dict[str, str]:
        return self.headers

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


def _parse(path: str) -> tuple[str, str | None, str, str | None, str | None]:
    """(api prefix, namespace, plural, name, subresource) of a URL path."""
    parts = path.strip("/").split("/")
    prefix, rest_ = (
        ("/".join(parts[:2]), parts[2:]) if parts[0] == "api" else ("/".join(parts[:3]), parts[3:])
    )
    namespace = None
    if rest_[0] == "namespaces" and len(rest_) > 2:
        namespace, rest_ = rest_[1], rest_[2:]
    return (
        prefix,
        namespace,
        rest_[0],
        (rest_[1] if len(rest_) > 1 else None),
        (rest_[2] if len(rest_) > 2 else None),
    )


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str, str], dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.fail: dict[tuple[str, str], int | tuple[int, str]] = {}
        """(method, path) -> the status (or status and message) every such call gets."""
        """(method, path) -> the error status that request answers."""
        self.before: Callable[[Call], None] | None = None
        self._lock = threading.RLock()
        self._versions = itertools.count(1)
        self.client = client.ApiClient(client.Configuration(host="http://fake"))
        self.client.rest_client.request = self.request  # type: ignore[method-assign]

    def add(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` at the collection `path` (as a create would), without recording a call."""
        with self._lock:
            status, created = self._create(path, obj)
        assert status == 201, f"{path} {obj['metadata']['name']} exists"
        return created

    def changed(self, obj: dict[str, Any]) -> None:
        """A test changed `obj` in place (as an agent's status write would): it gets a new
        resourceVersion, as every write through the API server does."""
        with self._lock:
            obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def get(self, path: str) -> dict[str, Any]:
        prefix, ns, plural, name, _ = _parse(path)
        assert name is not None
        return self.objects[(prefix, ns, plural, name)]

    def writes(self) -> list[Call]:
        return [c for c in self.calls if c.method != "GET"]

    def request(
        self,
        method: str,
        url: str,
        headers: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> rest.RESTResponse:
        parsed = urllib.parse.urlsplit(url)
        call = Call(method, parsed.path, body)
        if self.before is not None:
            self.before(call)
        with self._lock:
            self.calls.append(call)
            if (method, parsed.path) in self.fail:
                failure = self.fail[(method, parsed.path)]
                status, message = failure if isinstance(failure, tuple) else (failure, "")
                return rest.RESTResponse(
                    _Response(status, {"kind": "Status", "code": status, "message": message})
                )
            query = dict(urllib.parse.parse_qsl(parsed.query))
            status, data = self._handle(method, parsed.path, query, body)
        return rest.RESTResponse(_Response(status, data))

    def _handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        prefix, ns, plural, name, sub = _parse(path)
        if method == "POST":
            return self._create(path, body)
        if name is None:  # a list
            selector = dict(p.split("=", 1) for p in query.get("labelSelector", "").split(",") if p)
            items = [
                o
                for (p, n, pl, _), o in sorted(self.objects.items(), key=lambda kv: str(kv[0]))
                if (p, pl) == (prefix, plural)
                and ns in (None, n)
                and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
            ]
            return 200, {"items": items}
        obj = self.objects.get((prefix, ns, plural, name))
        if obj is None:
            return 404, {"kind": "Status", "code": 404}
        if method == "GET":
            return 200, obj
        if method == "DELETE":
            del self.objects[(prefix, ns, plural, name)]
            return 200, obj
        assert method == "PATCH", method
        want = (body.get("metadata") or {}).get("resourceVersion")
        if want is not None and want != obj["metadata"]["resourceVersion"]:
            return 409, {"kind": "Status", "code": 409}
        patch = {"status": body.get("status") or {}} if sub == "status" else body
        _merge(obj, {k: v for k, v in patch.items() if k != "status" or sub == "status"})
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return 200, obj

    def _create(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        prefix, ns, plural, _, _ = _parse(path)
        obj = json.loads(json.dumps(body))
        meta = obj.setdefault("metadata", {})
        if "name" not in meta:
            meta["name"] = f"{meta['generateName']}{next(self._versions)}"
        key = (prefix, ns or meta.get("namespace"), plural, meta["name"])
        if key in self.objects:
            return 409, {"kind": "Status", "code": 409}
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._versions))
        if ns:
            meta["namespace"] = ns
        self.objects[key] = obj
        return 201, obj
