"""The model repository: model.yaml validation, lookups, path safety, digests."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import ModelId, Priority
from node_agent.errors import DigestMismatch, InvalidModel, ModelNotFound, ModelUnavailable
from node_agent.runtime.model_names import validate_name, validate_version, version_sort_key
from node_agent.runtime.model_yaml import (
    CONFIG_FILE,
    config_to_mapping,
    parse_model_config,
    parse_quantity,
    write_model_config,
)
from node_agent.runtime.repository import ModelRepository, sha256_file
from node_agent.types import ModelConfig, TensorSpec

DIGEST = "sha256:" + "ab" * 32


def valid_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "clf",
        "version": "1",
        "format": "torchscript",
        "digest": DIGEST,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, -1, -1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
    }
    doc.update(overrides)
    return doc


def write_doc(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / CONFIG_FILE
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def repo_copy(example_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the example repository, free to tamper with."""
    return Path(shutil.copytree(example_repo, tmp_path / "repo"))


# -- parsing --------------------------------------------------------------------------------


def test_minimal_doc_parses_with_defaults(tmp_path: Path) -> None:
    config = parse_model_config(write_doc(tmp_path, valid_doc()))
    assert config.id == ModelId("clf", "1")
    assert config.inputs == (TensorSpec("image", "FP32", (3, -1, -1)),)
    assert config.outputs == (TensorSpec("logits", "FP32", (10,)),)
    assert config.artifact == "model.pt"
    assert (config.max_batch_size, config.priority, config.pinned) == (8, Priority.NORMAL, False)
    assert config.memory_estimate_bytes is None


def test_full_doc_parses(tmp_path: Path) -> None:
    doc = valid_doc(
        version=2,
        format="tensorrt",
        max_batch_size=32,
        priority="critical",
        pinned=True,
        memory_estimate_bytes="512Mi",
        max_queue_delay_s=0.002,
        p95_latency_s=0.05,
        p99_latency_s=0.1,
        task="predict",
        parameters={"seed": 3, "fast": True},
        inputs=[{"name": "x", "dtype": "INT64", "shape": []}],
    )
    config = parse_model_config(write_doc(tmp_path, doc))
    assert config.version == "2"  # an unquoted integer version is read as its text
    assert config.artifact == "model.plan"
    assert config.inputs == (TensorSpec("x", "INT64", ()),)  # 'dtype' accepted for 'datatype'
    assert config.priority is Priority.CRITICAL and config.pinned
    assert config.memory_estimate_bytes == 512 * 2**20
    assert config.sla == SlaObjectives(p95_latency_s=0.05, p99_latency_s=0.1)
    assert config.parameters == {"seed": "3", "fast": "true"}


def test_sla_objectives_from_fields_and_from_an_older_docs_parameters(tmp_path: Path) -> None:
    doc = valid_doc(
        p95_latency_s=0.05, p99_latency_s=0.1, max_error_rate=0.01, min_throughput_rps=20, sla_window_s=30
    )
    config = parse_model_config(write_doc(tmp_path, doc))
    assert config.sla == SlaObjectives(0.05, 0.1, max_error_rate=0.01, min_throughput_rps=20.0, window_s=30)
    older = valid_doc(
        p95_latency_s=0.05,
        parameters={"max_error_rate": "0.01", "min_throughput_rps": "20", "sla_window_s": "30", "seed": "3"},
    )
    config = parse_model_config(write_doc(tmp_path, older))
    assert config.sla == SlaObjectives(0.05, None, max_error_rate=0.01, min_throughput_rps=20.0, window_s=30)
    assert config.parameters == {"seed": "3"}  # the objectives are typed, not kept as strings
    assert not parse_model_config(write_doc(tmp_path, valid_doc())).sla.has_objectives
    for parameters, field in (
        ({"max_error_rate": "lots"}, "parameters.max_error_rate"),
        ({"max_error_rate": "2"}, ""),
    ):
        with pytest.raises(InvalidModel, match="max_error_rate") as caught:
            parse_model_config(write_doc(tmp_path, valid_doc(parameters=parameters)))
        assert field in str(caught.value)


def _without(key: str) -> dict[str, Any]:
    doc = valid_doc()
    del doc[key]
    return doc


def _tensor(**fields: Any) -> dict[str, Any]:
    return valid_doc(inputs=[{"name": "image", "datatype": "FP32", "shape": [3], **fields}])


MALFORMED: list[tuple[str, object, str]] = [
    ("missing name", _without("name"), "missing required field 'name'"),
    ("missing version", _without("version"), "missing required field 'version'"),
    ("missing digest", _without("digest"), "missing required field 'digest'"),
    ("missing inputs", _without("inputs"), "missing required field 'inputs'"),
    ("missing outputs", _without("outputs"), "missing required field 'outputs'"),
    ("bad dtype", _tensor(datatype="FLOAT32"), "'inputs[0].datatype': 'FLOAT32' is not a KServe"),
    ("lowercase dtype", _tensor(datatype="fp32"), "'inputs[0].datatype'"),
    ("zero dim", _tensor(shape=[3, 0]), "'inputs[0].shape': dimension 0"),
    ("negative dim", _tensor(shape=[-2]), "'inputs[0].shape': dimension -2"),
    ("float dim", _tensor(shape=[3.5]), "'inputs[0].shape': dimension 3.5"),
    ("bool dim", _tensor(shape=[True]), "'inputs[0].shape': dimension True"),
    ("string shape", _tensor(shape="3x64"), "'inputs[0].shape': expected a list"),
    ("too many dims", _tensor(shape=[1] * 9), "'inputs[0].shape': expected a list of at most 8"),
    (
        "missing shape",
        valid_doc(outputs=[{"name": "y", "datatype": "FP32"}]),
        "missing required field 'outputs[0].shape'",
    ),
    ("tensor extra field", _tensor(dims=[3]), "'inputs[0].dims': unknown tensor field"),
    ("empty inputs", valid_doc(inputs=[]), "'inputs': expected a non-empty list"),
    ("inputs not a list", valid_doc(inputs={"image": "FP32"}), "'inputs': expected a non-empty"),
    (
        "duplicate tensors",
        valid_doc(outputs=[{"name": "y", "datatype": "FP32", "shape": [1]}] * 2),
        "'outputs': duplicate tensor name(s) y",
    ),
    ("uppercase name", valid_doc(name="My_Model"), "field 'name': invalid model name 'My_Model'"),
    ("traversal name", valid_doc(name="../evil"), "field 'name': invalid model name '../evil'"),
    ("slash name", valid_doc(name="a/b"), "field 'name': invalid model name"),
    ("trailing dash name", valid_doc(name="clf-"), "field 'name': invalid model name"),
    ("long name", valid_doc(name="a" * 64), "field 'name': invalid model name"),
    ("traversal version", valid_doc(version="../1"), "field 'version': invalid model version"),
    ("dot version", valid_doc(version=".."), "field 'version': invalid model version"),
    ("dash version", valid_doc(version="-1"), "field 'version': invalid model version"),
    ("float version", valid_doc(version=1.1), "field 'version': 1.1 is a number; quote it"),
    ("bad digest", valid_doc(digest="md5:abc"), "field 'digest': 'md5:abc' is not 'sha256:'"),
    ("upper digest", valid_doc(digest="sha256:" + "AB" * 32), "field 'digest'"),
    ("unknown format", valid_doc(format="onnx"), "field 'format': unsupported format 'onnx'"),
    ("unknown task", valid_doc(task="train"), "field 'task': unknown task 'train'"),
    ("zero batch", valid_doc(max_batch_size=0), "field 'max_batch_size': 0 is out of range"),
    ("string batch", valid_doc(max_batch_size="8"), "field 'max_batch_size': expected an integer"),
    ("bool batch", valid_doc(max_batch_size=True), "field 'max_batch_size': expected an integer"),
    ("bad priority", valid_doc(priority="urgent"), "field 'priority': unknown priority 'urgent'"),
    ("string pinned", valid_doc(pinned="yes"), "field 'pinned': expected true or false"),
    ("negative memory", valid_doc(memory_estimate_bytes=-1), "field 'memory_estimate_bytes'"),
    ("word memory", valid_doc(memory_estimate_bytes="lots"), "field 'memory_estimate_bytes'"),
    ("zero p95", valid_doc(p95_latency_s=0), "field 'p95_latency_s': expected a positive"),
    ("error rate over 1", valid_doc(max_error_rate=1.5), "max_error_rate must be in [0, 1]"),
    ("fractional window", valid_doc(sla_window_s=2.5), "field 'sla_window_s': expected whole seconds"),
    ("negative delay", valid_doc(max_queue_delay_s=-1), "field 'max_queue_delay_s'"),
    ("absolute artifact", valid_doc(artifact="/etc/passwd"), "field 'artifact': '/etc/passwd'"),
    ("traversal artifact", valid_doc(artifact="../2/model.pt"), "field 'artifact'"),
    ("nested parameters", valid_doc(parameters={"a": {"b": 1}}), "field 'parameters.a'"),
    ("unknown field", valid_doc(max_batchsize=8), "unknown field(s) 'max_batchsize'"),
    ("top-level list", [valid_doc()], "expected a mapping of fields, got list"),
    ("empty document", None, "expected a mapping of fields, got NoneType"),
]


@pytest.mark.parametrize(
    ("doc", "message"), [(d, m) for _, d, m in MALFORMED], ids=[case for case, _, _ in MALFORMED]
)
def test_malformed_model_yaml_is_refused_with_a_clear_message(
    tmp_path: Path, doc: object, message: str
) -> None:
    path = write_doc(tmp_path, doc)
    with pytest.raises(InvalidModel) as info:
        parse_model_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b: c\n", "\t- tab\n"])
def test_invalid_yaml_names_the_file_and_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / CONFIG_FILE
    path.write_text(text)
    with pytest.raises(InvalidModel, match=r"not valid YAML at line \d+, column \d+") as info:
        parse_model_config(path)
    assert str(info.value).startswith(str(path))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="no such file"):
        parse_model_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidModel, match="cannot read"):
        parse_model_config(tmp_path / "bin.yaml")


def test_write_then_parse_round_trips(tmp_path: Path) -> None:
    config = ModelConfig(
        name="m",
        version="1.2-rc1",
        format="torchscript",
        inputs=(TensorSpec("a", "FP16", (-1, 4)), TensorSpec("b", "INT64", ())),
        outputs=(TensorSpec("c", "BOOL", (2,)),),
        artifact="weights/model.pt",
        digest=DIGEST,
        max_batch_size=3,
        priority=Priority.LOW,
        pinned=True,
        memory_estimate_bytes=1234,
        max_queue_delay_s=0.01,
        sla=SlaObjectives(p99_latency_s=0.5, max_error_rate=0.01, min_throughput_rps=5.0, window_s=30),
        parameters={"k": "v"},
    )
    path = write_model_config(tmp_path / "m" / "1.2-rc1", config)
    parsed = parse_model_config(path)
    assert parsed == config
    assert parsed.parameters == {"k": "v"}
    assert config_to_mapping(parsed) == config_to_mapping(config)
    first = path.read_bytes()
    write_model_config(path.parent, parsed)
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == [CONFIG_FILE]  # no temp files left


# -- names, versions, helpers ---------------------------------------------------------------


def test_name_and_version_rules() -> None:
    for good in ("a", "clf", "resnet-50", "0x"):
        assert validate_name(good) == good
    for bad in ("", "-a", "a-", "A", "a_b", "a.b", "..", "a/b", "a" * 64):
        with pytest.raises(InvalidModel):
            validate_name(bad)
    for good in ("1", "v1.2.3", "2-slow", "A_b.c-d", "x" * 63):
        assert validate_version(good) == good
    for bad in ("", ".", "..", "../1", "-1", "_1", "1/2", "x" * 64, "1 2"):
        with pytest.raises(InvalidModel):
            validate_version(bad)


def test_version_order_is_natural_with_prereleases_first() -> None:
    versions = ["10", "2", "1.10", "2-slow", "1", "1.9", "2-failing", "v3", "2.0"]
    assert sorted(versions, key=version_sort_key) == [
        "1",
        "1.9",
        "1.10",
        "2-failing",
        "2-slow",
        "2",
        "2.0",
        "10",
        "v3",
    ]


def test_sha256_file_and_quantities(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert parse_quantity("1024") == 1024
    assert parse_quantity("1.5Ki") == 1536
    assert parse_quantity("2G") == 2 * 10**9
    with pytest.raises(ValueError):
        parse_quantity("2 GB")


# -- the repository -------------------------------------------------------------------------


def test_index_lists_the_examples_sorted(example_repo: Path) -> None:
    repo = ModelRepository(example_repo)
    assert [str(c.id) for c in repo.index()] == [
        "classifier:1",
        "classifier:2-failing",
        "classifier:2-slow",
        "classifier:2",
        "mlp:1",
    ]
    assert repo.scan().broken == {}


def test_config_lookup(example_repo: Path) -> None:
    repo = ModelRepository(example_repo)
    assert repo.config("classifier").version == "2"  # newest; '-suffix' versions sort before
    assert repo.config("classifier", "2-slow").id == ModelId("classifier", "2-slow")
    assert repo.versions("classifier") == ["1", "2-failing", "2-slow", "2"]
    with pytest.raises(ModelNotFound, match="no model named 'nope'"):
        repo.config("nope")
    with pytest.raises(ModelNotFound, match="no model classifier:9"):
        repo.config("classifier", "9")
    for name, version in (("../classifier", "1"), ("classifier", "../mlp/1"), ("..", None)):
        with pytest.raises(ModelNotFound, match="invalid model"):
            repo.config(name, version)


def test_version_dir_refuses_traversal_and_escaping_symlinks(repo_copy: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repo_copy)
    assert repo.version_dir(ModelId("mlp", "1")) == repo_copy.resolve() / "mlp" / "1"
    for bad in (ModelId("..", "1"), ModelId("mlp", ".."), ModelId("mlp", "../../etc"), ModelId("/etc", "1")):
        with pytest.raises(InvalidModel):
            repo.version_dir(bad)
    outside = tmp_path / "outside"
    shutil.copytree(repo_copy / "mlp" / "1", outside)
    (repo_copy / "mlp" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidModel, match="resolves outside the repository"):
        repo.version_dir(ModelId("mlp", "evil"))
    # index() reports it as broken instead of following it
    assert repo_copy / "mlp" / "evil" in repo.scan().broken


def test_artifact_symlink_out_of_the_version_folder_is_refused(repo_copy: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repo_copy)
    config = repo.config("mlp", "1")
    artifact = repo_copy / "mlp" / "1" / config.artifact
    outside = tmp_path / "stolen.pt"
    shutil.move(artifact, outside)
    artifact.symlink_to(outside)
    with pytest.raises(InvalidModel, match="resolves outside"):
        repo.verify_digest(config)


def test_index_reports_broken_entries_and_keeps_the_rest(repo_copy: Path) -> None:
    (repo_copy / "mlp" / "1" / CONFIG_FILE).write_text("name: [unclosed\n")
    bad_name = repo_copy / "Bad_Name" / "1"
    bad_name.mkdir(parents=True)
    shutil.copy(repo_copy / "classifier" / "1" / CONFIG_FILE, bad_name / CONFIG_FILE)
    moved = repo_copy / "classifier" / "7"
    shutil.copytree(repo_copy / "classifier" / "1", moved)  # model.yaml still says version 1
    (repo_copy / "classifier" / "empty").mkdir()
    (repo_copy / ".hidden").mkdir()
    result = ModelRepository(repo_copy).scan()
    assert [str(c.id) for c in result.models] == [
        "classifier:1",
        "classifier:2-failing",
        "classifier:2-slow",
        "classifier:2",
    ]
    assert set(result.broken) == {
        repo_copy / "mlp" / "1",
        bad_name,
        moved,
        repo_copy / "classifier" / "empty",
    }
    assert "not valid YAML" in result.broken[repo_copy / "mlp" / "1"]
    assert "invalid model name 'Bad_Name'" in result.broken[bad_name]
    assert "declares classifier:1 but lies in the folder of classifier:7" in result.broken[moved]
    assert ModelRepository(repo_copy).index() == result.models


def test_missing_root_is_reported_not_raised(tmp_path: Path) -> None:
    result = ModelRepository(tmp_path / "missing").scan()
    assert result.models == [] and len(result.broken) == 1


def test_tampered_artifact_is_refused(repo_copy: Path) -> None:
    repo = ModelRepository(repo_copy)
    config = repo.config("mlp", "1")
    repo.verify_digest(config)  # intact: passes
    artifact = repo_copy / "mlp" / "1" / config.artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    actual = sha256_file(artifact)
    for call in (repo.verify_digest, lambda c: repo.load(c, "cpu")):
        with pytest.raises(DigestMismatch) as info:
            call(config)
        assert config.digest in str(info.value) and actual in str(info.value)
        assert "refusing to load" in str(info.value)


def test_missing_artifact_is_invalid(repo_copy: Path) -> None:
    repo = ModelRepository(repo_copy)
    config = repo.config("mlp", "1")
    (repo_copy / "mlp" / "1" / config.artifact).unlink()
    with pytest.raises(InvalidModel, match="is missing"):
        repo.load(config, "cpu")


def test_load_picks_the_backend_and_runs(example_repo: Path) -> None:
    import torch

    from node_agent.runtime.backends.torchscript import TorchScriptBackend

    repo = ModelRepository(example_repo)
    backend = repo.load(repo.config("mlp"), "cpu")
    try:
        assert isinstance(backend, TorchScriptBackend)
        out = backend.run({"features": torch.ones(3, 32)})
        assert out["scores"].shape == (3, 4)
    finally:
        backend.unload()


# -- containment (issue 16, part 3) -----------------------------------------------------------


def test_a_model_yaml_symlinked_out_of_the_repository_is_unavailable(repo_copy: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repo_copy)
    config_file = repo_copy / "mlp" / "1" / CONFIG_FILE
    outside = tmp_path / "elsewhere.yaml"
    shutil.move(config_file, outside)
    config_file.symlink_to(outside)
    with pytest.raises(ModelUnavailable, match=r"model\.yaml resolves outside the model repository") as info:
        repo.config("mlp", "1")
    assert str(tmp_path) not in str(info.value)
    broken = repo.scan().broken[repo_copy / "mlp" / "1"]
    assert "resolves outside" in broken and str(tmp_path) not in broken


def test_files_may_link_inside_the_repository_but_not_out(repo_copy: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repo_copy)
    # a second version sharing the first one's artifact through a symlink: inside, allowed
    second = repo_copy / "mlp" / "2"
    second.mkdir()
    config = repo.config("mlp", "1")
    write_model_config(second, dataclasses.replace(config, version="2"))
    (second / config.artifact).symlink_to(repo_copy / "mlp" / "1" / config.artifact)
    repo.verify_digest(repo.config("mlp", "2"))
    # the same link pointing out of the repository: ModelUnavailable from config() already
    outside = tmp_path / "copy.pt"
    shutil.copy(repo_copy / "mlp" / "1" / config.artifact, outside)
    (second / config.artifact).unlink()
    (second / config.artifact).symlink_to(outside)
    with pytest.raises(ModelUnavailable, match=r"artifact 'model\.pt' resolves outside") as info:
        repo.config("mlp", "2")
    assert str(tmp_path) not in str(info.value)


def test_problem_is_known_without_hashing_and_clears_when_the_file_changes(repo_copy: Path) -> None:
    repo = ModelRepository(repo_copy)
    config = repo.config("mlp", "1")
    artifact = repo_copy / "mlp" / "1" / config.artifact
    good = artifact.read_bytes()
    assert repo.problem(config) is None
    artifact.write_bytes(good + b"tampered")
    assert repo.problem(config) is None  # not hashed yet: nothing known
    with pytest.raises(DigestMismatch):
        repo.verify_digest(config)
    problem = repo.problem(config)
    assert problem is not None and "has digest sha256:" in problem and str(repo_copy) not in problem
    artifact.write_bytes(good)  # fixed: a different size, so the remembered hash no longer applies
    assert repo.problem(config) is None
    repo.verify_digest(config)
    artifact.unlink()
    assert "is missing" in (repo.problem(config) or "")


def test_model_errors_name_files_relative_to_the_repository(repo_copy: Path) -> None:
    (repo_copy / "mlp" / "1" / CONFIG_FILE).write_text("name: [unclosed\n")
    with pytest.raises(InvalidModel) as info:
        ModelRepository(repo_copy).config("mlp", "1")
    assert str(info.value).startswith("mlp/1/model.yaml: not valid YAML")
    assert str(repo_copy) not in str(info.value)


def test_temp_files_left_by_a_killed_writer_are_removed(repo_copy: Path) -> None:
    folder = repo_copy / "mlp" / "1"
    leftovers = [folder / ".model.pt.x1y2.tmp", folder / ".model.yaml.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    kept = [folder / "model.pt", folder / "notes.tmp", repo_copy / ".top.tmp"]
    (folder / "notes.tmp").write_text("not ours")
    (repo_copy / ".top.tmp").write_text("not in a version folder")
    repo = ModelRepository(repo_copy)
    assert sorted(repo.remove_temp_files()) == sorted(p.resolve() for p in leftovers)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert repo.remove_temp_files() == []


def test_readable_says_why_the_root_cannot_be_listed(repo_copy: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repo_copy)
    assert repo.readable() is None
    repo_copy.rename(tmp_path / "moved")
    why = repo.readable()
    assert why is not None and "cannot be read" in why and str(tmp_path) not in why
