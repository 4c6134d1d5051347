"""What a run needs to be reproduced: code version (commit and uncommitted diff), interpreter and
package versions, hosts, seeds, and a fingerprint of the dataset it read."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import socket
import subprocess
import sys

MAX_DIFF_BYTES = 256 * 1024
PACKAGES = ("ray-orchestrator", "torch", "ray", "numpy", "fsspec", "s3fs", "prometheus-client", "pyyaml")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    diff = _git("diff", "HEAD") or ""
    info = {
        "commit": commit.strip(),
        "branch": (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None,
        "dirty": bool(diff) or bool((_git("status", "--porcelain", "--untracked-files=no") or "").strip()),
        "diff": diff[:MAX_DIFF_BYTES],
    }
    if len(diff) > MAX_DIFF_BYTES:
        info["diff_truncated_bytes"] = len(diff)
    return info


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def dataset_fingerprint(uri: str, storage_options: dict | None = None) -> str | None:
    """sha256 of the dataset's index, which lists every shard's own sha256."""
    import fsspec

    try:
        with fsspec.open(uri.rstrip("/") + "/index.json", "rb", **(storage_options or {})) as f:
            return hashlib.sha256(f.read()).hexdigest()
    except Exception:  # provenance is best effort: reading the data itself reports real problems
        return None


def collect(cfg) -> dict:
    return {
        "git": git_info(),
        "versions": versions(),
        "driver_host": socket.gethostname(),
        "seed": cfg.run.seed,
        "dataset": {"uri": cfg.data.uri, "index_sha256": dataset_fingerprint(cfg.data.uri, cfg.data.storage_options)},
    }
