"""`AssignedConfigs`: what the engine serves in EdgeNode mode (the assigned, verified
versions only, with the spec's amendments), and the gate on the scheduler's loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from edgefleet_api.types import ModelId
from node_agent.errors import ModelNotFound
from node_agent.link.traffic import TrafficSplit
from node_agent.runtime.model_names import version_sort_key
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend


class AssignedConfigs:
    """The engine's config source in EdgeNode mode (`engine.ConfigSource`): the assigned,
    verified versions only, with the spec's amendments. `version=None` asks `traffic`.
    Mutated on the event loop's thread only; `loader` reads it from executor threads."""

    def __init__(self, traffic: TrafficSplit | None = None) -> None:
        self.traffic = traffic if traffic is not None else TrafficSplit()
        self._configs: dict[ModelId, ModelConfig] = {}
        self._assigned: frozenset[ModelId] = frozenset()

    def loader(self, load: Callable[[ModelConfig], Backend]) -> Callable[[ModelConfig], Backend]:
        """Wrap the scheduler's loader so that it loads assigned versions only, with their
        current config: a batcher the engine built for a version since withdrawn (or whose
        artifact changed) gets `ModelNotFound` (or the new artifact), never the old bytes."""

        def assigned_only(config: ModelConfig) -> Backend:
            current = self._configs.get(config.id)
            if current is None:
                raise ModelNotFound(f"model {config.id} is not assigned to this node")
            return load(current)

        return assigned_only

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        if version is None:
            version = self.traffic.choose(name)
            if version is None or ModelId(name, version) not in self._configs:
                versions = self.versions(name)
                if not versions:
                    raise ModelNotFound(f"model {name!r} is not assigned to this node")
                version = versions[-1]
        config = self._configs.get(ModelId(name, version))
        if config is None:
            raise ModelNotFound(f"model {name}:{version} is not assigned to this node")
        return config

    def versions(self, name: str) -> list[str]:
        """Servable versions of `name`, oldest first."""
        return sorted((m.version for m in self._configs if m.name == name), key=version_sort_key)

    def models(self) -> list[ModelConfig]:
        """Every servable version, by name then version."""
        return [
            self._configs[m]
            for m in sorted(self._configs, key=lambda m: (m.name, version_sort_key(m.version)))
        ]

    def assign(self, model_ids: Iterable[ModelId]) -> None:
        """The versions the assignment names, servable or not yet (being fetched, loaded)."""
        self._assigned = frozenset(model_ids)

    def assigned(self) -> frozenset[ModelId]:
        """Every assigned version; `versions`/`models` hold the servable ones among them."""
        return self._assigned

    def put(self, config: ModelConfig) -> None:
        self._configs[config.id] = config

    def remove(self, model_id: ModelId) -> None:
        self._configs.pop(model_id, None)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._configs
