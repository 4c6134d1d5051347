"""Which checkpoints to keep: the newest `keep_last`, every `keep_every`-th step, and optionally
the best by a metric. Runs after a commit, so a deletion always follows a newer commit; the
newest committed checkpoint is always kept (keep_last >= 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from checkpointing.config import BestMode, CheckpointConfig
from checkpointing.layout import MANIFEST, read_manifest, scan, step_dir


def plan(committed: list[int], *, keep_last: int, keep_every: int = 0, best_metric: str | None = None,
         mode: BestMode = BestMode.MIN, metrics: dict[int, dict[str, float]] | None = None) -> set[int]:
    """The committed steps to keep."""
    steps = sorted(committed)
    keep = set(steps[-max(1, keep_last):])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    if best_metric:
        scored = [(m[best_metric], s) for s, m in (metrics or {}).items() if s in steps and best_metric in m]
        if scored:
            pick = min if mode == BestMode.MIN else max
            keep.add(pick(scored)[1])
    return keep


def apply_retention(fs, root: str, cfg: CheckpointConfig, *, retry: Callable[[Callable[[], Any]], Any] = lambda f: f()
                    ) -> list[int]:
    """Delete what the plan drops, and partial folders older than the newest commit. Returns the
    deleted steps."""
    layout = scan(fs, root)
    if not layout.committed:
        return []
    metrics = {}
    if cfg.keep_best:
        for s in layout.committed:
            metrics[s] = retry(lambda s=s: read_manifest(fs, root, s)).get("metrics", {})
    keep = plan(layout.committed, keep_last=cfg.keep_last, keep_every=cfg.keep_every, best_metric=cfg.keep_best,
                mode=cfg.keep_best_mode, metrics=metrics)
    newest = layout.committed[-1]
    doomed = [s for s in layout.committed if s not in keep] + [s for s in layout.partial if s < newest]
    for s in sorted(doomed):
        path = f"{root.rstrip('/')}/{step_dir(s)}"
        # the manifest goes first: a half-deleted folder is then "partial", never a broken commit
        retry(lambda path=path: _rm_if_exists(fs, f"{path}/{MANIFEST}"))
        retry(lambda path=path: _rm_if_exists(fs, path, recursive=True))
    return sorted(doomed)


def _rm_if_exists(fs, path: str, recursive: bool = False) -> None:
    try:
        fs.rm(path, recursive=recursive) if recursive else fs.rm_file(path)
    except FileNotFoundError:
        pass
