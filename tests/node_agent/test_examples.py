"""make_examples and `edgefleet-agent make-examples`: layout, digests, determinism."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from node_agent import cli
from node_agent.examples import EXAMPLES, Conv3x3, Dense, build_module, estimate_memory_bytes, make_examples
from node_agent.runtime.model_yaml import CONFIG_FILE, parse_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
LAYOUT = ["classifier/1", "classifier/2", "classifier/2-slow", "classifier/2-failing", "mlp/1"]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_configs_and_digests(example_repo: Path) -> None:
    configs = ModelRepository(example_repo).index()
    assert sorted(f"{c.name}/{c.version}" for c in configs) == sorted(LAYOUT)
    assert sorted(_snapshot(example_repo)) == sorted(
        f"{v}/{f}" for v in LAYOUT for f in (CONFIG_FILE, "model.pt")
    )
    for config in configs:
        vdir = example_repo / config.name / config.version
        assert config.digest == sha256_file(vdir / config.artifact)
        assert config.format == "torchscript"
        assert config.memory_estimate_bytes is not None and config.memory_estimate_bytes > 0
    classifier = ModelRepository(example_repo).config("classifier", "1")
    assert [(t.name, t.datatype, t.shape) for t in classifier.inputs] == [("image", "FP32", (3, 64, 64))]
    assert [(t.name, t.datatype, t.shape) for t in classifier.outputs] == [("logits", "FP32", (10,))]
    mlp = ModelRepository(example_repo).config("mlp", "1")
    assert [(t.name, t.shape) for t in mlp.inputs] == [("features", (32,))]
    assert [(t.name, t.shape) for t in mlp.outputs] == [("scores", (4,))]


def test_same_bytes_on_every_run_in_process(example_repo: Path, tmp_path: Path) -> None:
    # Script an unrelated nn module first: scripting state left in the process (mangled
    # type names, cached types) must not change what make_examples writes.
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Linear(4, 2)))
    configs = make_examples(tmp_path)
    assert _snapshot(tmp_path) == _snapshot(example_repo)
    assert [f"{c.name}/{c.version}" for c in configs] == LAYOUT
    for config in configs:  # it returns exactly what it wrote
        parsed = parse_model_config(tmp_path / config.name / config.version / CONFIG_FILE)
        assert parsed == config
        assert parsed.parameters == config.parameters
    make_examples(tmp_path)  # rewriting in place is idempotent
    assert _snapshot(tmp_path) == _snapshot(example_repo)


@pytest.mark.slow
def test_same_bytes_from_another_process_hash_seed_and_directory(example_repo: Path, tmp_path: Path) -> None:
    """The CLI in a fresh interpreter (other PYTHONHASHSEED, other cwd) writes the same bytes."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = tmp_path / "elsewhere"
    script = f"import sys; from node_agent.cli import main; sys.exit(main(['make-examples', {str(out)!r}]))"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The CLI also writes the generation example (tiny-lm), which the fixture repository leaves out.
    written = {k: v for k, v in _snapshot(out).items() if not k.startswith("tiny-lm/")}
    assert written == _snapshot(example_repo)
    assert any(k.startswith("tiny-lm/1/") for k in _snapshot(out))
    assert len(proc.stdout.splitlines()) == len(LAYOUT) + 1


def test_archives_have_no_path_dependent_records(example_repo: Path) -> None:
    with zipfile.ZipFile(example_repo / "classifier" / "1" / "model.pt") as z:
        names = z.namelist()
        assert names and not [n for n in names if n.endswith((".debug_pkl", "serialization_id"))]
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert not any(b"/" + p.encode() in z.read(n) for n in names for p in ("tmp", "home", "work"))


def test_memory_estimates_cover_parameters_and_scale_with_batch() -> None:
    for example in EXAMPLES:
        module = build_module(example)
        sample = tuple(torch.zeros((1, *s.shape)) for s in example.inputs)
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        one = estimate_memory_bytes(module, sample, 1)
        eight = estimate_memory_bytes(module, sample, 8)
        assert params < one < eight
        assert eight - params == 8 * (one - params)


def _multiply_adds(module: nn.Module, image: torch.Tensor) -> int:
    total = 0

    def hook(m: nn.Module, _args: object, out: torch.Tensor) -> None:
        nonlocal total
        weight = m.weight  # [out, in, kh, kw] or [out, in]
        assert isinstance(weight, torch.Tensor)
        total += out.numel() * weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, Conv3x3 | Dense)]
    with torch.inference_mode():
        module(image)
    for h in handles:
        h.remove()
    return total


def test_slow_variant_really_computes_more() -> None:
    by_version = {e.version: e for e in EXAMPLES if e.name == "classifier"}
    image = torch.zeros(1, 3, 64, 64)
    fast = _multiply_adds(build_module(by_version["2"]), image)
    slow = _multiply_adds(build_module(by_version["2-slow"]), image)
    assert fast == 11_207_296
    assert slow >= 40 * fast


def test_failing_variant_fails_even_in_eager_mode() -> None:
    failing = build_module(next(e for e in EXAMPLES if e.version == "2-failing"))
    for image in (torch.zeros(1, 3, 64, 64), torch.randn(3, 3, 64, 64)):
        with pytest.raises(RuntimeError, match="fails on every batch, by design"):
            failing(image)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    # `make-examples` itself runs in test_same_bytes_from_another_process_hash_seed_and_directory
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "make-examples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_cli_reports_errors_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["make-examples", str(blocker / "repo")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent make-examples:") and "Traceback" not in err
