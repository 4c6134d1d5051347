"""Short names for messages."""

from __future__ import annotations


def node_label(node_id: str | None) -> str:
    """A Ray node id short enough for a message (56 hex digits in full)."""
    return node_id[:12] if node_id else "?"


def node_labels(node_ids) -> str:
    return ", ".join(node_label(n) for n in node_ids)
