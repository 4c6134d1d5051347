"""Checkpoint format, async writer, staggered writes, retries, manifests, verification, retention."""
