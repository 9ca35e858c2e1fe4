"""Who writes for what: shard ownership by Leases, as pure decisions (no I/O, no clock of its own).

One mechanism serves leader election and sharding. Every operator replica renews its own *member*
Lease; the live members are those whose member Lease this replica has seen renewed within its
duration. Every shard has a *shard* Lease: `FLEET_SHARD`, the fleet's decisions, and, when the
operator spreads sites (`site_shards`), N site shards, each the per-node work of the sites that hash
to it (`site_shard`: sites, not nodes, so a site's nodes stay together). The desired owner of a
shard is the rendezvous (highest random weight) hash of the shard over the live members: replicas
that see the same members pick the same owner, and a member joining or leaving moves only the
shards it wins or held (1/N of them). One shard and N replicas is leader election.

A replica (`shard_step`) acquires a shard Lease only when it is the desired owner and the Lease is
free or expired; renews it while it holds it and is still the desired owner; releases it when it is
not. The Lease I/O (`shard_leases`) makes every acquire, renew and release conditional on the
resourceVersion it read, so two replicas never both hold a shard. A replica that joins takes over
the shards it now wins: their holder stops writing and releases them, and the newcomer acquires
them at its next round (a pause of up to one renew period, the price of spreading shards evenly).

Clocks. A Lease is expired when this replica has seen the same resourceVersion for its
leaseDurationSeconds, measured on this replica's own monotonic clock from when it first saw that
version (client-go's leader election does the same): no two machines' clocks are ever compared. A
holder counts its hold valid (`Hold.valid`) until the moment it *sent* its last successful acquire
or renew, plus the duration, less a safety margin: every other replica saw that write after it was
sent, so the holder stops writing before anyone else may start. It checks before a pass and before
every write (`HoldLost`), so a pass that loses its hold stops writing.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FLEET_SHARD = "fleet"
"""The fleet's decisions: placement, rollouts, EdgeNodes and their specs, services' status and
bookkeeping. With no site shards, also every node's per-node work (one replica owns everything)."""
SITE_SHARD_PREFIX = "sites-"


def site_shards(count: int) -> tuple[str, ...]:
    """The site shards when sites are spread over `count` of them (none for 0)."""
    return tuple(f"{SITE_SHARD_PREFIX}{i}" for i in range(count))


@functools.cache
def site_shard(site: str, count: int) -> str:
    """The shard that does the per-node work (health from the agent's Lease, the agent Pod) of the
    nodes of `site` ("" for nodes without a site): one of `site_shards(count)` by a stable hash of
    the site, so a site's nodes are all one replica's; the fleet shard when `count` is 0."""
    if count <= 0:
        return FLEET_SHARD
    digest = hashlib.sha256(site.encode()).digest()
    return f"{SITE_SHARD_PREFIX}{int.from_bytes(digest[:8], 'big') % count}"


class HoldLost(Exception):
    """Raised before a write when this replica no longer holds (by its own clock) the shard it writes
    for: the pass stops; the holder's next pass, whoever it is, re-reads and re-plans."""


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A Lease as one replica sees it."""

    name: str
    holder: str
    """spec.holderIdentity; "" when free (released, or never held)."""
    duration_s: float
    """spec.leaseDurationSeconds, as its holder wrote it."""
    version: str
    """metadata.resourceVersion: it changes with every renew."""
    seen_s: float
    """Monotonic seconds on this replica's clock when it first saw this `version`."""

    def expired(self, now_s: float) -> bool:
        """Not renewed for its duration, by this replica's clock (see the module docstring)."""
        return now_s - self.seen_s >= self.duration_s

    def free(self, now_s: float) -> bool:
        return not self.holder or self.expired(now_s)


def live_members(members: Iterable[LeaseView], me: str, now_s: float) -> tuple[str, ...]:
    """The identities of the live replicas, sorted: those whose member Lease is unexpired, and
    always `me` (a replica that runs is alive, whether or not its own Lease was listed yet)."""
    live = {m.holder for m in members if m.holder and not m.expired(now_s)}
    return tuple(sorted(live | {me}))


def weight(member: str, shard: str) -> int:
    """The rendezvous weight of `member` for `shard`: a stable hash (the same in every process and
    Python version; `hash()` is salted per process)."""
    digest = hashlib.sha256(f"{shard}\0{member}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def desired_owner(shard: str, members: Sequence[str]) -> str | None:
    """The member that should own `shard`: the highest weight (ties, which need a 64-bit collision,
    go to the larger name); None when there are no members."""
    if not members:
        return None
    return max(members, key=lambda m: (weight(m, shard), m))


def assignment(shards: Iterable[str], members: Sequence[str]) -> dict[str, str | None]:
    """shard -> its desired owner, for every shard."""
    return {s: desired_owner(s, members) for s in shards}


class Step(enum.Enum):
    """What a replica does about one shard Lease this round."""

    ACQUIRE = "acquire"
    """Free or expired, and this replica is its desired owner: take it (conditional write)."""
    RENEW = "renew"
    """Held by this replica, which is still its desired owner."""
    RELEASE = "release"
    """Held by this replica, which is no longer its desired owner: stop writing, then free it."""
    STANDBY = "standby"
    """Held by another replica, or someone else's to take: nothing to do."""


def shard_step(shard: str, me: str, lease: LeaseView | None, members: Sequence[str], now_s: float) -> Step:
    """This replica's step for `shard`, whose Lease is `lease` (None: not created yet), given the live
    `members` (which include `me`) at `now_s` (this replica's monotonic clock)."""
    desired = desired_owner(shard, members)
    if lease is not None and lease.holder == me:
        if desired != me:
            return Step.RELEASE
        # An own hold that lapsed (renewals failed for a whole duration) is taken anew: the write
        # is conditional, so whoever else took it meanwhile wins.
        return Step.ACQUIRE if lease.expired(now_s) else Step.RENEW
    if desired == me and (lease is None or lease.free(now_s)):
        return Step.ACQUIRE
    return Step.STANDBY


@dataclass(frozen=True, slots=True)
class Hold:
    """This replica's hold on one shard, from its last successful acquire or renew."""

    shard: str
    sent_s: float
    """Monotonic seconds when that acquire or renew request was sent (not answered: the answer may
    come late; the others' clocks started when they saw the write, which is later still)."""
    duration_s: float

    def valid_until(self, margin_s: float) -> float:
        return self.sent_s + self.duration_s - margin_s

    def valid(self, margin_s: float, now_s: float) -> bool:
        """Whether this replica may still write for the shard at `now_s`: `margin_s` before anyone
        else could take it over."""
        return now_s < self.valid_until(margin_s)


def failover_bound_s(duration_s: float, renew_s: float) -> float:
    """The longest a shard goes without a writer after its holder dies (pass time aside): the others
    see its last renew up to one renew period late (they list every `renew_s`), wait `duration_s`
    from then, and take it at their next round, up to another renew period later."""
    return duration_s + 2 * renew_s
