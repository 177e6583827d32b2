"""The data plane: how values travel and persist (pickling, shared memory, the cache store)."""
