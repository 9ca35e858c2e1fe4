"""Installs that fit their job (issue 20): the operator needs no torch, each component's imports are
covered by the dependencies its extra declares, and the images' hashed locks cover them."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
COMPONENTS = {
    "operator": (REPO / "operator" / "edgefleet_operator", ("operator",)),
    "agent": (REPO / "node_agent", ("agent",)),
    "api": (REPO / "edgefleet_api", ()),
}
NOT_AT_RUNTIME = {"tensorrt", "pycuda", "grpc_tools"}
"""Imported only on GPU paths, behind an ImportError guard (the `gpu` extra), or by a maintainer's
generator (node_agent/serving/proto/generate.py: grpcio-tools, a dev dependency)."""


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """The base dependencies and those of `extras`, an extra's own `edgefleet[...]` expanded."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in PROJECT["optional-dependencies"][extra]:
            req = Requirement(raw)
            if req.name == PROJECT["name"]:
                todo += sorted(req.extras)
            elif req not in reqs:
                reqs.append(req)
    return reqs


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def closure(names: frozenset[str]) -> frozenset[str]:
    """The installed distributions `names` bring in (their requirements, transitively)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for raw in requires:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return frozenset(seen)


def third_party_imports(folder: Path) -> set[str]:
    """Top-level modules imported anywhere under `folder` that are neither ours nor stdlib."""
    ours = {"edgefleet_api", "edgefleet_operator", "node_agent"}
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in ours and m not in sys.stdlib_module_names}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_every_import_is_covered_by_the_components_dependencies(component: str) -> None:
    folder, extras = COMPONENTS[component]
    declared = frozenset(canonical(r.name) for r in requirements(extras))
    provided = closure(declared)
    dists = metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party_imports(folder) - NOT_AT_RUNTIME):
        owners = {canonical(d) for d in dists.get(module, [])}
        if not owners & provided:
            missing[module] = sorted(owners)
    assert not missing, f"{component} imports what its dependencies do not bring: {missing}"


def test_the_operator_imports_without_torch_numpy_or_the_agents_libraries() -> None:
    """Every operator module imports in a process where the agent's libraries cannot be found."""
    code = """
import importlib, pkgutil, sys
for name in ("torch", "numpy", "orjson", "pynvml", "node_agent"):
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
import edgefleet_operator, edgefleet_api
for pkg in (edgefleet_operator, edgefleet_api):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_operator_extra_holds_no_torch() -> None:
    names = closure(frozenset(canonical(r.name) for r in requirements(("operator",))))
    assert not names & {"torch", "numpy", "nvidia-ml-py"}, sorted(names)


def locked(which: str) -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) of docker/locks/<which>.txt."""
    text = (REPO / "docker" / "locks" / f"{which}.txt").read_text()
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if m:
            out[canonical(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return out


NOT_LOCKED = {"torch", "tensorrt"}
"""Pinned by version in the Dockerfiles from their own index: torch from TORCH_INDEX (its wheels
differ by index), TensorRT from NVIDIA's (PyPI holds stubs that fetch from there at install time)."""


@pytest.mark.parametrize(
    "which", ["operator", "agent", "gpu"], ids=lambda which: f"{which}.txt"
)  # not "gpu": conftest skips that keyword without CUDA
def test_the_image_locks_pin_every_dependency_with_hashes(which: str) -> None:
    pins = locked(which)
    assert pins and all(hashes > 0 for _, hashes in pins.values()), "a pin without a hash"
    for req in requirements((which,)):
        if req.name in NOT_LOCKED:
            assert canonical(req.name) not in pins
            continue
        name = canonical(req.name)
        assert name in pins, f"{which}.txt lacks {req}: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{which}.txt: {name}=={pins[name][0]} vs {req}"
        )


def test_the_gpu_lock_holds_pycudas_build_tools_and_resolves_for_the_images_python() -> None:
    """pycuda is an sdist built --no-build-isolation: its build tools come hashed from gpu-build.txt,
    the same pins as gpu.txt's; gpu.txt is resolved with Python 3.12 (Ubuntu 24.04's, the GPU
    image's), agent.txt with 3.11 (the CPU and Jetson images')."""
    gpu, build = locked("gpu"), locked("gpu-build")
    assert set(build) == {"setuptools", "wheel", "numpy"}
    assert all(gpu[name] == pin for name, pin in build.items())
    assert "pycuda" in gpu
    head = {
        which: (REPO / "docker" / "locks" / f"{which}.txt").read_text().splitlines()[0]
        for which in ("gpu", "agent")
    }
    assert "(Python 3.12)" in head["gpu"] and "(Python 3.11)" in head["agent"], head
