"""What both protocols serve, and the protocol-neutral steps of serving it.

HTTP (`serving.http`) and gRPC (`serving.grpc_server`) run one path: decode (their codec) ->
`InferRequest` -> `infer` (datatype and output checks, priority and timeout parameters, the
engine) -> the outputs -> encode. Auth, repository control (peer networks, model names) and
server metadata are decided here once, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgefleet_api.types import Priority
from node_agent.errors import InvalidInput
from node_agent.runtime.model_names import NAME_MAX_LEN, NAME_RE
from node_agent.serving import v2_codec
from node_agent.serving.statistics import ModelStatistics
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.generation.async_generator import AsyncGenerator

SERVER_NAME = "edgefleet-agent"
EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "parameters", "statistics")
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One model version in the repository index (Triton's fields)."""

    name: str
    version: str
    state: str
    """READY (servable; loaded on demand if not in memory) or UNAVAILABLE."""
    reason: str = ""


class ServingApi(Protocol):
    """What the protocol layers serve (implemented by `service.Serving`)."""

    def not_ready_reason(self) -> str | None:
        """None when the agent can serve inference; else why not (starting, draining, workers
        stuck, repository unreadable, nothing servable)."""
        ...

    def not_live_reason(self) -> str | None:
        """None while the process makes progress; else why it should be restarted."""
        ...

    def config(self, name: str, version: str | None) -> ModelConfig:
        """The config serving (name, version); ModelNotFound if unknown, ModelNotReady if
        unloaded or being unloaded."""
        ...

    def versions(self, name: str) -> list[str]: ...

    def model_not_ready_reason(self, name: str, version: str | None) -> str | None: ...

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        priority: Priority,
        timeout_s: float | None,
    ) -> Mapping[str, np.ndarray]: ...

    def index(self) -> list[IndexEntry]: ...

    def statistics(self, name: str, version: str | None) -> list[ModelStatistics]:
        """Triton's statistics extension: every servable version (`name` ""), every version of
        `name` (`version` None), or one (`statistics.model_statistics`)."""
        ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def generator(self, name: str, version: str | None) -> AsyncGenerator:
        """The running generator of a `task: generate` model (`generate.GeneratorProvider`)."""
        ...

    async def generating_models(self) -> list[str]:
        """The servable models that generate text (`openai_api.ModelsProvider`)."""
        ...


async def infer(
    api: ServingApi, config: ModelConfig, request: v2_codec.InferRequest
) -> Mapping[str, np.ndarray]:
    """Run a decoded request on `config`'s model: its datatypes and requested outputs checked
    (InvalidInput), its `priority` and `timeout` parameters honoured (Triton's meanings)."""
    v2_codec.check_request(request, config)
    priority = v2_codec.priority_from(request.parameters.get("priority"), config.priority)
    timeout_s = v2_codec.timeout_s_from(request.parameters.get("timeout"))
    return await api.infer(config.name, config.version, request.inputs, priority, timeout_s)


def bearer_token_matches(authorization: str | None, token: bytes) -> bool:
    """Whether an `Authorization` value is `Bearer <token>` (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


BEARER_HINT = "missing or invalid bearer token (send 'Authorization: Bearer <token>')"


def control_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """Parse CIDRs (ValueError naming a bad one)."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise ValueError(f"repository control network {cidr!r}: {e}") from None
    return tuple(out)


def peer_allowed(peer: str | None, networks: Sequence[Network]) -> bool:
    """Whether a peer address lies in one of `networks` (IPv4-mapped IPv6 counts as IPv4).
    Anything that is not an IP address (None, a Unix socket path) is refused."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def control_refusal(peer: str | None, networks: Sequence[Network], allowed: Sequence[str]) -> str | None:
    """Why `peer` may not load or unload models (403 / PERMISSION_DENIED), or None."""
    if peer_allowed(peer, networks):
        return None
    return (
        f"repository control is not allowed from {peer or 'this peer'}; the agent allows it from "
        f"{', '.join(allowed)} (see --allow-repository-control-from)"
    )


def check_control_name(name: str) -> str:
    """`name` if it is a valid model name to load or unload; InvalidInput (400) otherwise."""
    if len(name) > NAME_MAX_LEN or not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid model name {name[:80]!r}: expected lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {NAME_MAX_LEN} characters"
        )
    return name


def check_no_load_parameters(names: Sequence[str]) -> None:
    """Load takes no parameters (Triton's config or file overrides): InvalidInput if given."""
    if names:
        raise InvalidInput(
            f"load parameters are not supported ({', '.join(sorted(names))[:200]}): write the "
            "model (model.yaml and artifact) into the repository, then load it by name"
        )
