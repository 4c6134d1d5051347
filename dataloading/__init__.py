"""Token-shard datasets on fsspec URLs, the deterministic sampler, and its resumable state."""
