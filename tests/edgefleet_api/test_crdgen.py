"""The committed CRDs are the generator's output, and every field is typed and described."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_api import crdgen
from edgefleet_operator.cli import main as operator_main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("outdir", crdgen.OUTPUT_DIRS, ids=lambda d: str(d.relative_to(REPO)))
@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_committed_crds_match_the_generator(outdir: Path, name: str) -> None:
    committed = (outdir / name).read_text()
    assert committed == crdgen.render(crdgen.all_crds()[name]), (
        f"{outdir.relative_to(REPO)}/{name} is stale: run `make crds`"
    )


def walk(schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of schema nodes missing a type or a description."""
    problems = []
    if path and "description" not in schema:
        problems.append(f"{path}: no description")
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    for key, sub in schema.get("properties", {}).items():
        if path == "" and key in ("apiVersion", "kind", "metadata"):
            continue
        problems += walk(sub, f"{path}.{key}")
    if "items" in schema:
        problems += walk(schema["items"], f"{path}[]")
    return problems


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_every_field_is_typed_and_described(name: str) -> None:
    schema = crdgen.all_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert walk(schema) == []


def test_operator_cli_prints_the_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert operator_main(["crds"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert {d["spec"]["names"]["kind"] for d in docs} == {"InferenceService", "EdgeNode"}
