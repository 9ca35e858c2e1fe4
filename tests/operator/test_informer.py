"""The informer's store against a model of the API server (pure: no I/O): whatever the order in which
watch events, relists after 410 Gone, cut-and-resumed watches and the operator's own writes reach it,
once the watch has caught up the store holds exactly what the server holds, stripped; and it never
goes back to an older version of an object it has seen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_operator.informer import Store, key_of, strip_node, version_of

Obj = dict[str, Any]


@dataclass
class Server:
    """Objects by name with etcd-like revisions, and the event log a watch replays from."""

    objects: dict[str, Obj] = field(default_factory=dict)
    log: list[tuple[str, Obj]] = field(default_factory=list)
    revision: int = 10

    def write(self, name: str, value: int, delete: bool) -> tuple[str, Obj] | None:
        self.revision += 1
        if delete:
            old = self.objects.pop(name, None)
            if old is None:
                return None
            gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(self.revision)}}
            self.log.append(("DELETED", gone))
            return ("DELETED", gone)
        kind = "MODIFIED" if name in self.objects else "ADDED"
        obj = node(name, value, self.revision)
        self.objects[name] = obj
        self.log.append((kind, obj))
        return (kind, obj)


def node(name: str, value: int, revision: int) -> Obj:
    return {
        "metadata": {
            "name": name,
            "resourceVersion": str(revision),
            "labels": {"v": str(value)},
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "lastHeartbeatTime": str(revision)},
                {"type": "MemoryPressure", "status": "False"},
            ],
            "images": [{"names": ["big"], "sizeBytes": 1}],
        },
    }


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from("abcd"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("own"), st.sampled_from("abcd"), st.integers(0, 3)),
        st.tuples(st.just("deliver"), st.integers(1, 4)),
        st.tuples(
            st.just("cut"),
        ),
        st.tuples(
            st.just("gone"),
        ),
    ),
    max_size=60,
)


@given(OPS)
@settings(max_examples=150, deadline=None)
def test_the_store_converges_to_the_server_whatever_the_delivery(ops: list[tuple[Any, ...]]) -> None:
    server = Server()
    changes: list[tuple[str, str]] = []
    store = Store("Node", strip_node, lambda kind, event, obj: changes.append((event, key_of(obj))))
    store.replace([], str(server.revision))
    cursor = 0  # events of the log delivered so far
    highest: dict[str, int] = {}

    def deliver(upto: int) -> None:
        nonlocal cursor
        for kind, obj in server.log[cursor:upto]:
            if kind == "DELETED":
                store.delete(obj)
            else:
                store.put(obj, kind)
        cursor = max(cursor, upto)

    for op in ops:
        if op[0] == "write":
            server.write(op[1], op[2], op[3])
        elif op[0] == "own":  # the operator's write: the object it returned, offered before its event
            written = server.write(op[1], op[2], delete=False)
            assert written is not None
            store.put(written[1])
        elif op[0] == "deliver":
            deliver(min(len(server.log), cursor + op[1]))
        elif op[0] == "cut":
            pass  # a cut watch resumes from the last event delivered: nothing is lost, nothing replayed
        else:  # 410 Gone: the log before now is compacted; relist, watch from the list's revision
            store.replace(list(server.objects.values()), str(server.revision))
            cursor = len(server.log)
        for key, obj in store.snapshot().items():  # never back to an older version
            version = version_of(obj) or 0
            assert version >= highest.get(key, 0)
            highest[key] = version
    deliver(len(server.log))
    assert store.snapshot() == {k: strip_node(v) for k, v in server.objects.items()}


def test_heartbeats_are_stored_but_are_no_change() -> None:
    changes: list[str] = []
    store = Store("Node", strip_node, lambda kind, event, obj: changes.append(event))
    store.put(node("a", 1, 11), "ADDED")
    store.put(node("a", 1, 12), "MODIFIED")  # only the kubelet's heartbeat and the version moved
    assert changes == ["ADDED"]
    assert store.get("a") is not None and version_of(store.get("a") or {}) == 12
    store.put(node("a", 2, 13), "MODIFIED")
    assert changes == ["ADDED", "MODIFIED"]
    stored = store.get("a") or {}
    assert "managedFields" not in stored["metadata"]
    assert stored["status"] == {
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": None, "reason": None}]
    }


def test_a_relist_keeps_an_own_write_newer_than_the_list() -> None:
    store = Store("Node", strip_node)
    store.replace([node("a", 1, 11)], "11")
    store.put(node("b", 1, 13))  # written by the operator after the list below was served
    store.put(node("a", 2, 14))
    store.replace([node("a", 1, 11)], "12")
    assert sorted(store.snapshot()) == ["a", "b"]
    assert (store.get("a") or {})["metadata"]["labels"] == {"v": "2"}
    store.replace([], "20")  # both gone by revision 20
    assert store.snapshot() == {}


def test_a_deletion_does_not_remove_a_newer_recreation() -> None:
    store = Store("Node", strip_node)
    store.put(node("a", 1, 11))
    store.put(node("a", 2, 15))  # re-created (the operator's write, offered before the events)
    store.delete(node("a", 1, 12))  # the first object's deletion, delivered late
    assert (store.get("a") or {})["metadata"]["labels"] == {"v": "2"}
    store.delete(node("a", 2, 16))
    assert store.get("a") is None


def test_a_failed_watch_makes_the_cache_blind_until_a_pass_has_seen_it() -> None:
    from kubernetes import client

    from edgefleet_operator.fleet_cache import FleetCache
    from edgefleet_operator.settings import OperatorSettings
    from edgefleet_operator.watching import WatchingSettings

    cache = FleetCache(
        client.ApiClient(client.Configuration(host="http://nowhere")), OperatorSettings(), WatchingSettings()
    )
    leases = cache.informers["Lease"]
    assert cache.blind()  # nothing connected yet
    for informer in cache.informers.values():
        informer._answered()
    assert not cache.blind()
    leases._failed(TimeoutError("read timed out"))
    leases._answered()  # back already: the span between was still not observed
    assert cache.blind()
    assert not cache.blind()
    leases._failed(ConnectionRefusedError(111, "refused"))
    assert cache.blind() and cache.blind()  # still down
