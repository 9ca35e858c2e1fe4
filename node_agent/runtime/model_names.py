"""Model names and version labels: what is valid (the CRDs' patterns) and how versions sort.

Importing it loads no backend (no torch), so the link's pure modules may order versions.
"""

from __future__ import annotations

import re
from typing import Any

from node_agent.errors import InvalidModel

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NAME_MAX_LEN = 63
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_name(name: object) -> str:
    """Return `name` if it is a valid model name, else raise `InvalidModel`."""
    if not isinstance(name, str) or len(name) > NAME_MAX_LEN or not NAME_RE.match(name):
        raise InvalidModel(
            f"invalid model name {name!r}: expected a DNS label (lowercase letters, digits and "
            f"'-', starting and ending with a letter or digit, at most {NAME_MAX_LEN} characters)"
        )
    return name


def validate_version(version: object) -> str:
    """Return `version` if it is a valid version label, else raise `InvalidModel`."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidModel(
            f"invalid model version {version!r}: expected 1-63 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return version


def version_sort_key(version: str) -> tuple[Any, ...]:
    """Natural order; a '-suffix' marks a pre-release sorting before the bare version."""
    base, sep, pre = version.partition("-")
    return (_natural(base), 0 if sep else 1, _natural(pre))


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.findall(r"\d+|\D+", text))
