"""Small real example models and `make_examples(root)`, which writes them as a repository.

Written layout (all TorchScript, fixed seeds), `<model>/<version>`:

- classifier/1: ImageClassifier, seed 1; image FP32 [3,64,64] -> logits FP32 [10]
- classifier/2: ImageClassifier, seed 2; same signature
- classifier/2-slow: SlowImageClassifier; same signature, 41x the multiply-adds
  (48-channel convolutions at full resolution)
- classifier/2-failing: FailingImageClassifier; same signature, ALWAYS raises RuntimeError
  after computing the logits
- mlp/1: MLP, seed 3; features FP32 [32] -> scores FP32 [4]

The failing variant fails on every batch (by design: a version that always fails is what a
rollback demo needs); it still loads, so a rollout can put it into service.

Determinism: the same torch version writes the same bytes on every run and from any
install location. `torch.jit.save` already writes fixed zip timestamps, but its
`*.debug_pkl` records embed the absolute path of this source file and its
`.data/serialization_id` is a checksum over them; `_stable_archive` drops those records
(TorchScript loads fine without them; only error tracebacks lose Python line numbers) and
rewrites the zip with fixed timestamps. And TorchScript writes the `__constants__` of torch's
nn layers in Python set order, which follows the per-process hash seed, so the models are
built from plain layers (`Conv3x3`, `Dense`) that have none and share one scripted type.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgefleet_api.types import Priority
from node_agent.runtime.backends.torchscript import jit_deprecations_silenced
from node_agent.runtime.model_yaml import write_model_config
from node_agent.runtime.repository import sha256_file
from node_agent.types import ModelConfig, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Iterator

ARTIFACT = "model.pt"
IMAGE_SHAPE = (3, 64, 64)
NUM_CLASSES = 10
FEATURES = 32
SCORES = 4
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_DROPPED_RECORDS = (".debug_pkl", "/.data/serialization_id")


class Conv3x3(nn.Module):
    """3x3 convolution (stride 1, padding 1) then ReLU; nn.Conv2d's default init.

    The example models use these plain layers (no nn.Sequential, no nn layers with
    `__constants__`) because TorchScript writes nn layers' constants in Python set order,
    which changes with the hash seed from one process to the next.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, self.weight, self.bias, padding=1))


class Dense(nn.Module):
    """Affine layer with nn.Linear's default init (no activation)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ImageClassifier(nn.Module):
    """A small CNN: image [B,3,64,64] -> logits [B,10] (11.2M multiply-adds per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = Conv3x3(3, 16)
        self.conv2 = Conv3x3(16, 32)
        self.conv3 = Conv3x3(32, 64)
        self.head = Dense(64, NUM_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(image), 2)  # 16 x 32 x 32
        x = F.max_pool2d(self.conv2(x), 2)  # 32 x 16 x 16
        x = self.conv3(x).mean(dim=[2, 3])  # 64
        return self.head(x)


class SlowImageClassifier(nn.Module):
    """The classifier's interface with much more real compute: six 48-channel convolutions
    at the full 64x64 resolution (458M multiply-adds per image, 41x ImageClassifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv3x3(3, 48)
        self.conv1 = Conv3x3(48, 48)
        self.conv2 = Conv3x3(48, 48)
        self.conv3 = Conv3x3(48, 48)
        self.conv4 = Conv3x3(48, 48)
        self.conv5 = Conv3x3(48, 48)
        self.conv6 = Conv3x3(48, 64)
        self.head = Dense(64, NUM_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        x = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        x = self.conv6(F.max_pool2d(x, 2)).mean(dim=[2, 3])
        return self.head(x)


class FailingImageClassifier(nn.Module):
    """The classifier's interface; computes the logits, then always raises RuntimeError."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ImageClassifier()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(image)
        if logits.numel() >= 0:  # always true; keeps the return path for the type checker
            raise RuntimeError("classifier/2-failing fails on every batch, by design")
        return logits


class MLP(nn.Module):
    """features [B,32] -> scores [B,4]: two hidden layers of 64 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = Dense(FEATURES, 64)
        self.fc2 = Dense(64, 64)
        self.fc3 = Dense(64, SCORES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(features)))))


@dataclass(frozen=True, slots=True)
class Example:
    """One example model version: how to build it and what its model.yaml says."""

    name: str
    version: str
    build: Callable[[], nn.Module]
    seed: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    priority: Priority
    description: str


_IMAGE_IN = (TensorSpec("image", "FP32", IMAGE_SHAPE),)
_LOGITS_OUT = (TensorSpec("logits", "FP32", (NUM_CLASSES,)),)

EXAMPLES: tuple[Example, ...] = (
    Example(
        "classifier",
        "1",
        ImageClassifier,
        1,
        _IMAGE_IN,
        _LOGITS_OUT,
        16,
        Priority.NORMAL,
        "small CNN image classifier",
    ),
    Example(
        "classifier",
        "2",
        ImageClassifier,
        2,
        _IMAGE_IN,
        _LOGITS_OUT,
        16,
        Priority.NORMAL,
        "small CNN image classifier, retrained (other seed)",
    ),
    Example(
        "classifier",
        "2-slow",
        SlowImageClassifier,
        2,
        _IMAGE_IN,
        _LOGITS_OUT,
        16,
        Priority.NORMAL,
        "deliberately slow variant: 41x the multiply-adds of classifier/2",
    ),
    Example(
        "classifier",
        "2-failing",
        FailingImageClassifier,
        2,
        _IMAGE_IN,
        _LOGITS_OUT,
        16,
        Priority.NORMAL,
        "deliberately failing variant: raises RuntimeError on every batch",
    ),
    Example(
        "mlp",
        "1",
        MLP,
        3,
        (TensorSpec("features", "FP32", (FEATURES,)),),
        (TensorSpec("scores", "FP32", (SCORES,)),),
        64,
        Priority.HIGH,
        "small MLP scorer",
    ),
)


def build_module(example: Example) -> nn.Module:
    """The example's eager module with its fixed-seed weights, in eval mode."""
    torch.manual_seed(example.seed)
    return example.build().eval()


def estimate_memory_bytes(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...], max_batch_size: int
) -> int:
    """Parameters and buffers, plus `max_batch_size` x (the inputs and every leaf module's
    output for one sample): an upper-bound guess used until the agent has measured."""
    params = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    per_sample = sum(t.numel() * t.element_size() for t in example_inputs)

    def hook(_m: nn.Module, _args: object, out: object) -> None:
        nonlocal per_sample
        if isinstance(out, torch.Tensor):
            per_sample += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in _leaves(module)]
    try:
        with torch.inference_mode():
            module(*example_inputs)
    except RuntimeError:
        pass  # the failing example raises after its layers ran (and were counted)
    finally:
        for h in handles:
            h.remove()
    return params + max_batch_size * per_sample


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if not list(m.children()))


def _stable_archive(scripted: torch.jit.ScriptModule) -> bytes:
    """`torch.jit.save` bytes without path-dependent records, with fixed zip timestamps."""
    raw = io.BytesIO()
    torch.jit.save(scripted, raw)
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst,
    ):
        for info in src.infolist():
            if info.filename.endswith(_DROPPED_RECORDS):
                continue
            dst.writestr(zipfile.ZipInfo(info.filename, _ZIP_EPOCH), src.read(info.filename))
    return out.getvalue()


def write_example(root: Path, example: Example) -> ModelConfig:
    """Script, save and describe one example under `root/<name>/<version>/`."""
    module = build_module(example)
    sample = tuple(torch.zeros((1, *spec.shape), dtype=torch.float32) for spec in example.inputs)
    estimate = estimate_memory_bytes(module, sample, example.max_batch_size)
    with jit_deprecations_silenced():
        scripted = torch.jit.script(module)
        archive = _stable_archive(scripted)
    version_dir = Path(root) / example.name / example.version
    version_dir.mkdir(parents=True, exist_ok=True)
    artifact = version_dir / ARTIFACT
    tmp = version_dir / f".{ARTIFACT}.tmp"
    tmp.write_bytes(archive)
    tmp.replace(artifact)
    config = ModelConfig(
        name=example.name,
        version=example.version,
        format="torchscript",
        inputs=example.inputs,
        outputs=example.outputs,
        artifact=ARTIFACT,
        digest=sha256_file(artifact),
        max_batch_size=example.max_batch_size,
        priority=example.priority,
        memory_estimate_bytes=estimate,
        parameters={"description": example.description, "seed": str(example.seed)},
    )
    write_model_config(version_dir, config)
    return config


def make_examples(root: Path | str) -> list[ModelConfig]:
    """Write every example under `root` (created if needed); returns their configs.

    Same torch version -> byte-identical artifacts and model.yaml files on every run.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return [write_example(root, example) for example in EXAMPLES]
