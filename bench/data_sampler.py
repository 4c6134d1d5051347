"""Our GlobalSampler vs torch.utils.data.DistributedSampler, side by side in one run.

For each dataset size N and implementation, a fresh subprocess (so peak memory is its own):
  resume_ms      time from "resume at sample N/2" to having this rank's first batch in hand
                 (torch has no resume: a user builds the iterator and skips ahead)
  batch_us       median cost of each following rank batch
  ids_per_s      rank ids per second at the median batch cost
  peak_rss_mb    peak resident memory above the interpreter baseline (VmHWM - VmRSS at start)
Both libraries are warmed up on a tiny instance first, so resume_ms is the algorithm, not imports.
Plus a shuffle-quality table at N = 10**6 against torch.randperm: |corr(position, id)| (0 = no
trend), the median |id difference| of neighbouring samples over N (locality; ~0.29 for an ideal
shuffle), and how many 10**4-sequence blocks a batch of 1000 touches (what the node cache holds).

    .venv/bin/python bench/data_sampler.py [--repeats 5] [--quick]

The last line printed is one JSON object with every median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

GLOBAL_BATCH, WORLD, RANK, BATCHES = 4096, 8, 3, 100  # 100 batches fit after N/2 at N = 10**6


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Len:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def case(impl: str, n: int) -> dict:
    import numpy as np
    import torch

    from dataloading.sampler import GlobalSampler

    per_rank = GLOBAL_BATCH // WORLD
    start_step = (n // 2) // GLOBAL_BATCH
    # warm up both libraries' first-call costs on a tiny instance: measure resume, not imports
    from torch.utils.data import DistributedSampler

    list(itertools.islice(iter(DistributedSampler(_Len(64), num_replicas=2, rank=0, seed=1)), 4))
    for mode in ("global", "block"):
        GlobalSampler(64, 8, 1, mode=mode, block_size=8).local_batch(9, 1, 2)
    base = _rss_kb("VmRSS")
    times = []
    if impl == "torch":
        t0 = time.perf_counter()
        sampler = DistributedSampler(_Len(n), num_replicas=WORLD, rank=RANK, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        it = iter(sampler)
        first = list(itertools.islice(it, start_step * per_rank, start_step * per_rank + per_rank))
        resume = time.perf_counter() - t0
        for _ in range(BATCHES):
            t = time.perf_counter()
            batch = list(itertools.islice(it, per_rank))
            times.append(time.perf_counter() - t)
        assert len(first) == len(batch) == per_rank
    else:
        mode = {"ours-global": "global", "ours-block": "block"}[impl]
        state = GlobalSampler(n, GLOBAL_BATCH, 0, mode=mode, block_size=100_000).state_dict(start_step)
        t0 = time.perf_counter()
        sampler, step = GlobalSampler.from_state(state, world_size=WORLD)
        first = sampler.local_batch(step, RANK, WORLD)
        resume = time.perf_counter() - t0
        for k in range(1, BATCHES + 1):
            t = time.perf_counter()
            batch = sampler.local_batch(step + k, RANK, WORLD)
            times.append(time.perf_counter() - t)
        assert len(first) == len(batch) == per_rank
    del np, torch
    med = statistics.median(times)
    return {
        "resume_ms": resume * 1e3,
        "batch_us": med * 1e6,
        "ids_per_s": per_rank / med,
        "peak_rss_mb": (_rss_kb("VmHWM") - base) / 1024,
    }


def quality() -> dict:
    """Shuffle quality at N = 10**6, one epoch, against torch.randperm."""
    import numpy as np
    import torch

    from dataloading.sampler import GlobalSampler

    n, b = 10**6, 1000

    def stats(ids: np.ndarray, block: int) -> dict:
        pos = np.arange(len(ids))
        blocks_per_batch = np.mean([len(np.unique(ids[i : i + b] // block)) for i in range(0, len(ids), b)])
        return {
            "pos_id_corr": float(abs(np.corrcoef(pos, ids)[0, 1])),
            "median_neighbour_gap_over_n": float(np.median(np.abs(np.diff(ids))) / n),  # ideal ~0.29
            "blocks_of_1e4_per_batch_of_1000": float(blocks_per_batch),
        }

    g = torch.Generator().manual_seed(0)
    out = {"torch.randperm": stats(torch.randperm(n, generator=g).numpy(), 10_000)}
    s = GlobalSampler(n, b, 0)
    out["ours-global"] = stats(np.concatenate([s.global_batch(k) for k in range(n // b)]), 10_000)
    for w in (1, 4, 16):
        s = GlobalSampler(n, b, 0, mode="block", block_size=10_000, window_blocks=w)
        out[f"ours-block(10k x {w})"] = stats(np.concatenate([s.global_batch(k) for k in range(n // b)]), 10_000)
    return out


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode:
        raise RuntimeError(f"{args}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke test)")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(a.case[0], int(float(a.case[1])))))
        return
    if a.quality:
        print(json.dumps(quality()))
        return
    plan = [("torch", n) for n in (10**6, 10**7)]  # 10**8 needs ~4 GB and minutes: a list of N ints
    plan += [(impl, n) for impl in ("ours-global", "ours-block") for n in (10**6, 10**8, 10**9, 10**10)]
    if a.quick:
        plan = [(impl, n) for impl, n in plan if n <= 10**6]
    results: dict = {}
    for impl, n in plan:
        runs = [run_child(["--case", impl, str(n)]) for _ in range(a.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[f"{impl} N=1e{len(str(n)) - 1}"] = med
        print(f"{impl:12s} N=1e{len(str(n)) - 1:<3d} resume {med['resume_ms']:10.3f} ms  batch {med['batch_us']:9.1f} us  "
              f"{med['ids_per_s'] / 1e6:7.2f} M ids/s  peak +{med['peak_rss_mb']:8.1f} MB", flush=True)
    q = run_child(["--quality"])
    for name, row in q.items():
        print(f"quality {name:22s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "global_batch": GLOBAL_BATCH, "world": WORLD, "repeats": a.repeats,
        "results": results, "quality": q,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
