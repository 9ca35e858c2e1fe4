"""Which agent reports the operator believes: `ReportLedger`, kept in memory from pass to pass.

An EdgeNode's status is its agent's report. A report can arrive out of order or be replayed (an old
status written back by a restore, a stale client, a hand-made `kubectl replace`): its
reportSequence is then lower than one already seen from that node. The ledger keeps, per
EdgeNode (by name and uid: a recreated EdgeNode starts afresh), the highest sequence seen and the
report that carried it; a report whose sequence went backwards is ignored and the last accepted
one stands in for it. After an operator restart the first report of each node is accepted.

It also remembers, per EdgeNode spec entry (service, model, version, digest), the spec generation
at which that entry first appeared (`set_at`): a report whose observedGeneration is older describes
the node before it was told to run that version (`rollout.analysis.observe` ignores it for that
version). Entries seen first after an operator restart are dated at the generation then read,
which is never earlier than the true one: a restart can delay an analysis, never hurry it.

No I/O; the reader calls `accept` with every EdgeNode it parses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgefleet_api.edge_node import EdgeNode, EdgeNodeStatus
from edgefleet_api.model_spec import ModelRef

EntryKey = tuple[str, ModelRef]
"""(service, (model, version, digest)): an EdgeNode spec entry as analysis names it."""


@dataclass(slots=True)
class _NodeRecord:
    uid: str
    highest: int
    accepted: EdgeNodeStatus
    set_at: dict[EntryKey, int] = field(default_factory=dict)


class ReportLedger:
    """Per EdgeNode: the highest reportSequence seen, the report accepted with it, and when each
    spec entry was set (see the module docstring). `ignored` counts the reports refused."""

    def __init__(self) -> None:
        self._nodes: dict[str, _NodeRecord] = {}
        self.ignored = 0

    def accept(self, edge_node: EdgeNode, uid: str = "") -> EdgeNode:
        """`edge_node` as the operator should believe it: its spec as read, and its status unless
        the report's sequence went backwards (then the last report accepted from it)."""
        name, status = edge_node.name, edge_node.status
        record = self._nodes.get(name)
        if record is None or record.uid != uid:
            record = self._nodes[name] = _NodeRecord(uid, status.report_sequence, status)
        elif status.report_sequence >= record.highest:
            record.highest, record.accepted = status.report_sequence, status
        else:
            self.ignored += 1
            edge_node = dataclasses.replace(edge_node, status=record.accepted)
        current = {
            (m.service, ModelRef(m.model, m.version, m.artifact.digest)) for m in edge_node.spec.models
        }
        record.set_at = {k: record.set_at.get(k, edge_node.generation) for k in current}
        return edge_node

    def set_at(self, name: str) -> Mapping[EntryKey, int]:
        """Spec entry -> the spec generation that set it, for EdgeNode `name` (empty: unknown)."""
        record = self._nodes.get(name)
        return dict(record.set_at) if record is not None else {}

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget the EdgeNodes that are gone."""
        keep = set(names)
        self._nodes = {n: r for n, r in self._nodes.items() if n in keep}
