"""Regenerate `grpc_service_pb2.py` and `.pyi` from `grpc_service.proto` (needs grpcio-tools).

protoc registers generated messages in protobuf's default descriptor pool, where
tritonclient.grpc registers the same `inference` package (a process holding both fails to
import the second); the generated module is rewritten to use a pool of its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def main() -> int:
    from grpc_tools import protoc

    proto = str(HERE / "grpc_service.proto")
    args = ["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}", proto]
    if protoc.main(args) != 0:
        return 1
    module = HERE / "grpc_service_pb2.py"
    text = module.read_text(encoding="utf-8")
    if text.count(DEFAULT_POOL) != 1:
        print(f"{module}: expected one {DEFAULT_POOL!r}; protoc's output changed", file=sys.stderr)
        return 1
    module.write_text(text.replace(DEFAULT_POOL, OWN_POOL), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
