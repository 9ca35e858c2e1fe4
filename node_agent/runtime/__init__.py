"""The model runtime: repository, backends, memory-aware scheduler and eviction, stream pool,
batcher and batching policy, and the engine that routes requests to them."""
