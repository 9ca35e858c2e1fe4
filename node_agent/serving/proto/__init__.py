"""The v2 gRPC protocol's messages: `grpc_service.proto` and the Python generated from it.

`grpc_service_pb2.py` and `.pyi` are generated (committed; `python -m
node_agent.serving.proto.generate` rewrites them after an edit of the .proto, with grpcio-tools
from the dev extra). They live in a descriptor pool of their own, not protobuf's default one:
tritonclient.grpc registers the same `inference` package there, and a process may hold both
(a test, a benchmark, an application embedding the agent).
"""
