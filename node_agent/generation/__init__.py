"""Token generation: KV blocks and the paged KV cache, the tiny transformer, and the continuous
batching engine."""
