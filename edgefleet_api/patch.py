"""JSON merge patches (RFC 7386): the one way both halves write what changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 JSON merge patch that turns `old` into `new`; {} when they are equal.

    Keys absent from `new` become None (deleted: a merge patch keeps the keys it does not name,
    so without the nulls a dropped field, a finished wave's waveStartTime say, would stay in the
    object and be read back); nested objects are diffed likewise; lists are replaced whole.
    `new` must not hold None values (a merge patch cannot set a null)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return {} if old == new else new
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            if isinstance(value, Mapping) and isinstance(old[key], Mapping):
                patch[key] = merge_patch(old[key], value)
            else:
                patch[key] = value
    return patch
