"""Ray actor classes. Plain classes here; `ray.remote` is applied where they are created."""
