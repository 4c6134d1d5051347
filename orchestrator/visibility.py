"""Storage every node can see: before a multi-node group trains, one node writes a marker where
checkpoints go and every other node must read it back, and every node must read the dataset's
index. A node-local path on a multi-node group would otherwise scatter checkpoints across the
nodes' own disks, and a restart would find none (or another node's)."""

from __future__ import annotations

import secrets

from checkpointing.storage import open_fs
from common.errors import UserError
from common.labels import node_labels

MARKER = ".orchestrator-visible-"


def write_marker(uri: str, storage_options: dict, token: str) -> None:
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{MARKER}{token}", token.encode())


def read_marker(uri: str, storage_options: dict, token: str) -> str | None:
    """None when this node sees the marker, else what it saw instead."""
    try:
        fs, root = open_fs(uri, storage_options)
        got = fs.cat_file(f"{root}/{MARKER}{token}")
    except FileNotFoundError:
        return "no marker there"
    except Exception as e:  # any failure to read is the answer
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None if got == token.encode() else "another file in its place"


def remove_marker(uri: str, storage_options: dict, token: str) -> None:
    fs, root = open_fs(uri, storage_options)
    try:
        fs.rm_file(f"{root}/{MARKER}{token}")
    except FileNotFoundError:
        pass


def read_index(uri: str, storage_options: dict) -> str | None:
    from dataloading.index import read_index as read

    try:
        read(uri, storage_options=storage_options)
    except Exception as e:  # any failure to read is the answer
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def check(run_on, nodes: list[str], *, checkpoint_uri: str, checkpoint_options: dict, data_uri: str | None,
          data_options: dict) -> None:
    """run_on(node, fn, *args) -> fn's result on that node, for each of `nodes` (one per node).
    Raises one UserError naming the nodes that cannot see the storage, and the fix."""
    if len(nodes) < 2:
        return
    token = secrets.token_hex(8)
    first, others = nodes[0], nodes[1:]
    run_on(first, write_marker, checkpoint_uri, checkpoint_options, token)
    try:
        blind = {n: why for n in others if (why := run_on(n, read_marker, checkpoint_uri, checkpoint_options, token))}
    finally:
        run_on(first, remove_marker, checkpoint_uri, checkpoint_options, token)
    if blind:
        why = next(iter(blind.values()))
        raise UserError(f"checkpoint.uri={checkpoint_uri!r} is not shared: node(s) {node_labels(blind)} cannot read "
                        f"a marker written there by node {node_labels([first])} ({why}); checkpoints would scatter "
                        "across the nodes' own disks. Use an object store (s3://...) or a mount every node shares")
    if data_uri:
        blind = {n: why for n in nodes if (why := run_on(n, read_index, data_uri, data_options))}
        if blind:
            raise UserError(f"data.uri={data_uri!r}: node(s) {node_labels(blind)} cannot read the dataset "
                            f"({next(iter(blind.values()))}); put it where every node can read it (an object "
                            "store, or a shared mount)")
