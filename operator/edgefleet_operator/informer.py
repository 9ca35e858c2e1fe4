"""One kind of object kept in memory from a list and a watch (`edgefleet_api.list_watch`): what a
fleet pass reads instead of listing the fleet (`fleet_cache`).

`Store` holds the objects by key, stripped of what no pass reads (`strip_*`: managedFields, a Node's
images and heartbeats, a Pod's spec), so memory per node stays flat. It keeps, per key, the newest
object it was given: an object replaces the stored one only if its resourceVersion is not older. Its
sources are the watch's events, each list (a relist replaces the store: objects gone from the list
are deleted, unless stored from a write newer than the list), and the operator's own writes
(`offer`: the object a write returned, so the next pass decides from it even before its event
arrives). resourceVersions are compared as integers (etcd's revisions, which every API server
serving our resources uses); one that is not an integer always replaces.

The store reports each change that matters (the stripped object differs, resourceVersion aside) to
`on_change(kind, type, obj)`, on the watch's thread; an update that changed nothing a pass reads
(a Node's heartbeat, a Lease renewal seen by a kind that ignores it) is stored silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from edgefleet_api.list_watch import ListWatch, ListWatchTimings

log = logging.getLogger(__name__)
Obj = dict[str, Any]
OnChange = Callable[[str, str, Obj], None]
"""(kind, event type ADDED/MODIFIED/DELETED, the object as stored, or as last stored if deleted)."""

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def key_of(obj: Mapping[str, Any]) -> str:
    """'namespace/name', or 'name' for a cluster-scoped object."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def version_of(obj: Mapping[str, Any]) -> int | None:
    """metadata.resourceVersion as an integer; None when absent or not one."""
    return _int((obj.get("metadata") or {}).get("resourceVersion"))


def strip_metadata(obj: Obj) -> Obj:
    """`obj` without managedFields and kubectl's last-applied copy (a new dict where it changes)."""
    meta = obj.get("metadata")
    if not meta or ("managedFields" not in meta and LAST_APPLIED not in (meta.get("annotations") or {})):
        return obj
    meta = {k: v for k, v in meta.items() if k != "managedFields"}
    if LAST_APPLIED in (meta.get("annotations") or {}):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != LAST_APPLIED}
    return {**obj, "metadata": meta}


def strip_node(obj: Obj) -> Obj:
    """A Node as placement and health read it: metadata, taints, the Ready condition without its
    heartbeat (kubelet renews that; it would otherwise count as a change)."""
    out = strip_metadata(obj)
    status = obj.get("status") or {}
    ready = [
        {k: c.get(k) for k in ("type", "status", "lastTransitionTime", "reason")}
        for c in status.get("conditions") or []
        if c.get("type") == "Ready"
    ]
    taints = (obj.get("spec") or {}).get("taints")
    return {
        "metadata": out["metadata"],
        "spec": {"taints": taints} if taints else {},
        "status": {"conditions": ready},
    }


def strip_pod(obj: Obj) -> Obj:
    """An agent Pod as a pass reads it: metadata, its node, phase and IP."""
    out = strip_metadata(obj)
    status = obj.get("status") or {}
    return {
        "metadata": out["metadata"],
        "spec": {"nodeName": (obj.get("spec") or {}).get("nodeName")},
        "status": {k: status[k] for k in ("phase", "podIP") if k in status},
    }


def strip_service(obj: Obj) -> Obj:
    """A Service as a pass reads it: metadata and its ports (the agents' gRPC port may come or go)."""
    ports = (obj.get("spec") or {}).get("ports") or []
    return {"metadata": strip_metadata(obj)["metadata"], "spec": {"ports": ports}}


class Store:
    """Objects of one kind by key, newest resourceVersion kept (see the module docstring).
    Thread-safe: the watch thread writes, a pass's threads read and offer."""

    def __init__(self, kind: str, strip: Callable[[Obj], Obj], on_change: OnChange | None = None) -> None:
        self.kind = kind
        self.strip = strip
        self.on_change = on_change
        self._objs: dict[str, Obj] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._objs)

    def snapshot(self) -> dict[str, Obj]:
        """Key -> object, a copy of the mapping (objects are never changed in place: share them)."""
        with self._lock:
            return dict(self._objs)

    def get(self, key: str) -> Obj | None:
        return self._objs.get(key)

    def put(self, obj: Obj, event: str = "MODIFIED") -> bool:
        """Store `obj` unless the stored one is newer; returns whether anything a pass reads changed."""
        new = self.strip(obj)
        key = key_of(new)
        with self._lock:
            old = self._objs.get(key)
            if old is not None and _older(new, old):
                return False
            self._objs[key] = new
        changed = old is None or not _same(old, new)
        if changed:
            self._notify("ADDED" if old is None else event, new)
        return changed

    def delete(self, obj: Obj) -> bool:
        """Forget the object `obj` names unless the stored one is newer than `obj` (a re-creation
        after the deletion); returns whether one was forgotten."""
        key = key_of(obj)
        with self._lock:
            old = self._objs.get(key)
            if old is None or _older(obj, old, equal_is_older=False):
                return False
            del self._objs[key]
        self._notify("DELETED", old)
        return True

    def replace(self, items: Iterable[Obj], list_version: str) -> None:
        """A list's result is the truth at `list_version`: its objects are stored (unless a newer one
        is), and stored objects it lacks are deleted unless they are newer than the list."""
        listed_at = _int(list_version)
        seen = set()
        for obj in items:
            seen.add(key_of(obj))
            self.put(obj, "MODIFIED")
        with self._lock:
            gone = [
                (k, o)
                for k, o in self._objs.items()
                if k not in seen and (listed_at is None or (version_of(o) or 0) <= listed_at)
            ]
            for k, _ in gone:
                del self._objs[k]
        for _, old in gone:
            self._notify("DELETED", old)

    def _notify(self, event: str, obj: Obj) -> None:
        if self.on_change is not None:
            self.on_change(self.kind, event, obj)


def _int(raw: Any) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _older(new: Mapping[str, Any], old: Mapping[str, Any], equal_is_older: bool = False) -> bool:
    """Whether `new` is older than `old` (by resourceVersion; unknown versions are never older)."""
    a, b = version_of(new), version_of(old)
    if a is None or b is None:
        return False
    return a < b or (equal_is_older and a == b)


def _same(a: Obj, b: Obj) -> bool:
    """Equal but for metadata.resourceVersion."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        if k == "metadata":
            ma, mb = v or {}, b.get(k) or {}
            if {x: y for x, y in ma.items() if x != "resourceVersion"} != {
                x: y for x, y in mb.items() if x != "resourceVersion"
            }:
                return False
        elif v != b[k]:
            return False
    return True


class Informer:
    """A `Store` fed by its own `ListWatch` on a daemon thread. `synced` is set once the first list is
    stored (and cleared by nothing: a later failure leaves the last state in place, as a relist would
    find it)."""

    def __init__(
        self,
        kind: str,
        call: Callable[..., Any],
        timings: ListWatchTimings,
        strip: Callable[[Obj], Obj] = strip_metadata,
        on_change: OnChange | None = None,
    ) -> None:
        self.kind = kind
        self.store = Store(kind, strip, on_change)
        self.synced = threading.Event()
        self.failures = 0
        """Failed lists and watches so far (a watch that went silent counts)."""
        self.connected = False
        """A watch request was answered after the last failure: the store is live."""
        self.list_watch = ListWatch(
            kind,
            call,
            timings,
            listed=self._listed,
            event=self._event,
            answered=self._answered,
            failed=self._failed,
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.list_watch.stop()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def restart(self) -> None:
        """Cut the watch (its connection may be dead); it resumes on a new one at once."""
        self.list_watch.restart()

    def _run(self) -> None:
        try:
            self.list_watch.run()
        except Exception:  # a bug, not the API server: the loop itself catches what calls raise
            log.exception("informer %s stopped", self.kind)

    def _listed(self, items: list[Obj], version: str) -> None:
        self.store.replace(items, version)
        self.synced.set()

    def _event(self, kind: str, obj: Obj) -> None:
        if kind == "DELETED":
            self.store.delete(obj)
        else:
            self.store.put(obj, kind)

    def _answered(self) -> None:
        self.connected = True

    def _failed(self, exc: BaseException) -> None:
        self.connected = False
        self.failures += 1
        log.warning("watch of %s failed (%s); retrying", self.kind, exc)
