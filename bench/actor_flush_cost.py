"""CPU of the metrics actor per rank flush, in-process (no Ray): the figure docs/SCALE.md gives
for the store writer (0.65 ms before SeriesStore.append_many).

A MetricsActor on a fresh SQLite store (its real anomaly and straggler detectors) takes --flushes
ticks of --ranks ranks through `log_columns_many` (a node's ranks in one call, as
bench/control_plane.py --aggregate sends them), each rank's batch the 50 keys of one step of
bench/control_plane_sim.py. Reported: this process's CPU per rank flush, the median of
--repeats, after one warm-up tick. It imports only what every version of the tree has, so the
same script measures an older tree: `PYTHONPATH=OLD_TREE python OLD_TREE/bench/actor_flush_cost.py`.

    .venv/bin/python bench/actor_flush_cost.py [--ranks 128] [--flushes 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from control_plane_sim import step_values  # noqa: E402

from actors.metrics_actor import MetricsActor  # noqa: E402
from orchestrator.anomaly import AnomalyDetector  # noqa: E402
from orchestrator.store import Store  # noqa: E402


def tick(ranks: int, step: int, rng: random.Random) -> list[tuple]:
    out = []
    for rank in range(ranks):
        values = step_values(step, time.time(), 1.0, rng)
        out.append((rank, step + 1, {k: (np.array([step]), np.array([v])) for k, v in values.items()}, 0))
    return out


def once(ranks: int, flushes: int, folder: str) -> float:
    actor = MetricsActor("run", folder, open_store=Store, detector=AnomalyDetector())
    rng = random.Random(0)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(actor.log_columns_many(tick(ranks, 0, rng)))  # warm-up: the series are made
        ticks = [tick(ranks, step, rng) for step in range(1, flushes + 1)]
        cpu0 = time.process_time()
        for batches in ticks:
            loop.run_until_complete(actor.log_columns_many(batches))
        cpu = time.process_time() - cpu0
        n = actor.store.db.execute("SELECT SUM(n) FROM series WHERE key NOT LIKE 'health/straggler%'").fetchone()[0]
        assert n == (flushes + 1) * ranks * 50, n  # every point stored
        return 1000 * cpu / (flushes * ranks)
    finally:
        loop.close()
        actor.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=128)
    ap.add_argument("--flushes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="actor-flush-") as folder:
            runs.append(once(args.ranks, args.flushes, folder))
    print(json.dumps({"bench": "actor_flush_cost", "tree": str(ROOT), "ranks": args.ranks, "flushes": args.flushes,
                      "cpu_ms_per_rank_flush": round(statistics.median(runs), 4),
                      "runs": [round(r, 4) for r in runs]}))


if __name__ == "__main__":
    main()
