"""Where checkpoints go: resolve the destination URL, open its filesystem, and check it early."""

from __future__ import annotations

import os
import secrets
from typing import Any

import fsspec

from checkpointing.errors import CheckpointError


def resolve_uri(uri: str | None, run_id: str, home: str | os.PathLike) -> str:
    """The run's checkpoint root: `uri` as given, or $ORCHESTRATOR_HOME/checkpoints/RUN_ID."""
    if uri:
        return uri.rstrip("/")
    return os.path.join(os.fspath(home), "checkpoints", run_id)


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path inside it); one clear error for an unknown protocol or bad options."""
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as e:
        raise CheckpointError(f"checkpoint.uri={uri!r}: cannot open it: {e}") from None


def check_destination(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write, read back and delete a small probe file, so a bad destination fails at launch
    instead of at the first checkpoint, hours in."""
    fs, root = open_fs(uri, storage_options)
    probe = f"{root}/.probe-{secrets.token_hex(4)}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        if fs.cat_file(probe) != b"ok":
            raise OSError("the probe file read back different bytes")
        fs.rm_file(probe)
    except Exception as e:  # any failure here is the user's destination, not our bug
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint.uri={uri!r}: cannot write there: {type(e).__name__}: {first}"
        ) from None
