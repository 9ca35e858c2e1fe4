"""Hugging Face checkpoint directories as model versions (model.yaml `format: huggingface`).

A version folder holds an unchanged Hugging Face checkpoint (config.json, one
model.safetensors or shards with model.safetensors.index.json, tokenizer.json,
tokenizer_config.json, optionally generation_config.json and chat_template.jinja) plus:
- `SHA256SUMS`, the artifact: `sha256sum` lines (`<hex>  <relative path>`) for every file
  of the checkpoint. model.yaml's `digest` pins it (the repository checks that), and the
  backend checks every listed file against it before reading any (`DigestMismatch`
  otherwise), so the whole directory is pinned by one digest. `write_checksums` writes it;
  `sha256sum -c SHA256SUMS` checks it by hand.
- model.yaml (`write_hf_model` writes one): `task: generate`, and `parameters`:
  `quantization` (`none`, default; `int8`: weight-only, per-output-channel scales; `int4`:
  weight-only, a scale per 64 inputs of a channel, see `hf_llama`),
  `dtype` (`float32`, default, `bfloat16` or `float16`: the compute dtype; the KV pool is
  float32), `max_context` (tokens served, default min(the model's, 4096)),
  `kv_cache_bytes` and `kv_block_size` as for TinyLM (default KV: `DEFAULT_HF_KV_CONTEXTS`
  full contexts).

To serve a downloaded checkpoint: `python -m node_agent.generation.hf_checkpoint
models/qwen/1 qwen --quantization int8` writes SHA256SUMS and model.yaml into the folder
(the agent's repository layout `<root>/<name>/<version>/`); an InferenceService names
`format: huggingface` and the digest it prints (the digest of SHA256SUMS). The folder may also
stay where it is and be fetched: put it on an https origin (or a file:// path on the node) and
give the artifact `uri` of its SHA256SUMS, `digest` (SHA256SUMS') and `configDigest` (model.yaml's):
the agent fetches the manifest, then every file it lists from beside it, each verified by its
line (`node_agent.link.artifacts`); or push its files to an OCI registry (`oci://`, one layer
per file: `node_agent.link.oci`). docs/huggingface_checkpoints.md says how, for each.

`HFCheckpointBackend.memory_bytes` is what the weights hold as loaded (int8 weights and
their scales after quantization) plus the KV pool: the scheduler's budget and the node's
reported model memory read it. Only `LlamaForPaged`'s architectures load (`hf_llama`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from edgefleet_api.types import Priority
from node_agent.errors import InvalidModel
from node_agent.generation.hf_llama import LlamaForPaged, LlamaShape
from node_agent.generation.hf_tokenizer import HFTokenizer
from node_agent.generation.kv_cache import kv_bytes_per_token
from node_agent.generation.transformer import (
    KV_CACHE_PARAMETER,
    KV_DTYPE_BYTES,
    TinyLMBackend,
    kv_block_size_for,
    kv_cache_bytes_for,
)
from node_agent.runtime.checksums import CHECKSUMS_FILE, verify_checksums, write_checksums
from node_agent.runtime.model_yaml import parse_quantity, write_model_config
from node_agent.runtime.repository import sha256_file
from node_agent.types import ModelConfig, TensorSpec

__all__ = [
    "CHECKSUMS_FILE",
    "DEFAULT_HF_KV_CONTEXTS",
    "DEFAULT_MAX_CONTEXT",
    "HF_FORMAT",
    "HFCheckpointBackend",
    "SafetensorsCheckpoint",
    "load_hf_model",
    "load_safetensors",
    "verify_checksums",
    "write_checksums",
    "write_hf_model",
]

log = logging.getLogger(__name__)

HF_FORMAT = "huggingface"
"""model.yaml `format` of a Hugging Face checkpoint directory."""
DEFAULT_MAX_CONTEXT = 4096
"""Context served unless `parameters.max_context` says otherwise (capped by the model's):
real checkpoints declare 32k-128k positions, whose KV an edge box cannot hold for many
sequences; the KV default and the RoPE tables are sized by the served context."""
DEFAULT_HF_KV_CONTEXTS = 4
"""Without `kv_cache_bytes`, the KV pool holds this many full served contexts (paged, a
session holds only its tokens, so 4 x 4096 tokens hold dozens of chat sessions)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint's .safetensors files by name, each read from disk when
    asked for (memory-mapped files; nothing is held but what the caller keeps)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Any] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as e:
                raise InvalidModel(f"{path.name}: cannot read: {e}") from None
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            tensor: torch.Tensor = self._where[name].get_tensor(name)
        except SafetensorError as e:
            raise InvalidModel(f"weights: cannot read {name}: {e}") from None
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._where  # without reading the tensor

    def numel(self, name: str) -> int:
        """Elements of a tensor, from the file's header (nothing read)."""
        return math.prod(self._where[name].get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_safetensors(directory: Path | str) -> SafetensorsCheckpoint:
    """Every tensor of the checkpoint, read on demand: the shards
    model.safetensors.index.json names, else model.safetensors, else every *.safetensors
    file (never pickle)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidModel(f"{index.name}: malformed: {e}") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise InvalidModel("the checkpoint has no .safetensors weights")
    paths = []
    for name in files:
        path = (directory / name).resolve()
        if not path.is_relative_to(directory.resolve()):
            raise InvalidModel(f"weights file {name!r} is outside the checkpoint")
        paths.append(path)
    return SafetensorsCheckpoint(paths)


def _hf_config(directory: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"config.json: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidModel("config.json: expected a JSON object")
    gen = directory / "generation_config.json"
    if gen.is_file():  # its eos_token_id (often a list) is what generate stops on
        try:
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None
        if eos is not None:
            cfg = {**cfg, "eos_token_id": eos}
    return cfg


def load_hf_model(
    directory: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    device: str | torch.device = "cpu",
) -> tuple[LlamaForPaged, HFTokenizer]:
    """The model and tokenizer of a checkpoint directory (files not checked against
    checksums: the backend does that first). EOS ids: config.json's (generation_config.json's
    when present) and the tokenizer's eos_token."""
    directory = Path(directory)
    tokenizer = HFTokenizer.from_dir(directory)
    shape = LlamaShape.from_hf(_hf_config(directory), max_context)
    eos = tuple(dict.fromkeys(shape.eos_token_ids + tokenizer.eos_token_ids))
    if eos != shape.eos_token_ids:
        shape = dataclasses.replace(shape, eos_token_ids=eos)
    model = LlamaForPaged.from_hf_state(shape, load_safetensors(directory), dtype, quantization=quantization,
                                        for_cpu=torch.device(device).type == "cpu")  # fmt: skip
    return model.to(device), tokenizer


class HFCheckpointBackend(TinyLMBackend):
    """A `huggingface` model version: a Llama-family checkpoint in the paged engine.

    A `TinyLMBackend` to the serving layer (the generate path starts an engine over any),
    with its own model, tokenizer and memory: weights as loaded (after quantization) plus
    the KV pool. The predict path (input_ids -> logits) works as for TinyLM."""

    model: LlamaForPaged | None

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> HFCheckpointBackend:
        manifest = Path(version_dir) / config.artifact
        verify_checksums(manifest)
        p = config.parameters
        dtype_name = p.get("dtype", "float32")
        if dtype_name not in DTYPES:
            raise InvalidModel(
                f"{config.id}: parameters.dtype {dtype_name!r}: expected one of {', '.join(DTYPES)}"
            )
        try:
            max_context = int(p.get("max_context", DEFAULT_MAX_CONTEXT))
        except ValueError:
            raise InvalidModel(f"{config.id}: parameters.max_context must be an integer") from None
        model, tokenizer = load_hf_model(
            manifest.parent, dtype=DTYPES[dtype_name], quantization=p.get("quantization", "none"),
            max_context=max_context, device=device,
        )  # fmt: skip
        block_size = kv_block_size_for(config, model.config) if config.task == "generate" else None
        kv_bytes = kv_cache_bytes_for(config, model.config, block_size, DEFAULT_HF_KV_CONTEXTS)
        log.info("loaded %s: %s, %d layers, %s weights, %d weight bytes", config.id,
                 model.config.model_type, model.config.n_layers, model.quantization,
                 model.weight_bytes())  # fmt: skip
        return cls(config, model, model.weight_bytes(), kv_bytes, block_size, tokenizer)


def write_hf_model(
    version_dir: Path | str,
    name: str,
    version: str = "1",
    *,
    quantization: str = "none",
    parameters: dict[str, str] | None = None,
) -> ModelConfig:
    """Make a folder holding a Hugging Face checkpoint a model version: write SHA256SUMS
    and model.yaml (`format: huggingface`, `task: generate`, a memory estimate of the
    weights as they will be loaded plus the default KV pool)."""
    version_dir = Path(version_dir)
    shape = LlamaShape.from_hf(_hf_config(version_dir), DEFAULT_MAX_CONTEXT)
    params = {"quantization": quantization, **(parameters or {})}
    manifest = write_checksums(version_dir)
    weights = load_safetensors(version_dir)
    n_weights = sum(weights.numel(name) for name in weights)
    weight_bytes = int(n_weights * {"int8": 1, "int4": 0.6}.get(quantization, 4))
    raw_kv = params.get(KV_CACHE_PARAMETER)
    kv_bytes = parse_quantity(raw_kv) if raw_kv else (
        DEFAULT_HF_KV_CONTEXTS * shape.max_seq_len
        * kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, KV_DTYPE_BYTES)
    )  # fmt: skip
    config = ModelConfig(
        name=name,
        version=version,
        format=HF_FORMAT,
        inputs=(TensorSpec("input_ids", "INT64", (-1,)),),
        outputs=(TensorSpec("logits", "FP32", (-1, shape.vocab_size)),),
        artifact=CHECKSUMS_FILE,
        digest=sha256_file(manifest),
        max_batch_size=8,
        priority=Priority.NORMAL,
        memory_estimate_bytes=weight_bytes + kv_bytes,
        task="generate",
        parameters=params,
    )
    write_model_config(version_dir, config)
    return config


def main(argv: list[str] | None = None) -> int:
    """`python -m node_agent.generation.hf_checkpoint DIR NAME [VERSION] [--quantization int8]`:
    make a downloaded checkpoint folder (e.g. `huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct
    --local-dir models/qwen/1`) a model version of the agent's repository; prints its digest."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m node_agent.generation.hf_checkpoint")
    parser.add_argument("directory", type=Path)
    parser.add_argument("name")
    parser.add_argument("version", nargs="?", default="1")
    parser.add_argument("--quantization", choices=("none", "int8", "int4"), default="none")
    parser.add_argument(
        "--max-context", type=int, default=None, help="tokens served (parameters.max_context)"
    )
    args = parser.parse_args(argv)
    params = {} if args.max_context is None else {"max_context": str(args.max_context)}
    config = write_hf_model(args.directory, args.name, args.version, quantization=args.quantization,
                            parameters=params)  # fmt: skip
    print(f"{args.directory / 'model.yaml'}: {config.id}, artifact {CHECKSUMS_FILE}, digest {config.digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
