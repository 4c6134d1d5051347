"""Our GlobalSampler vs torch.utils.data.DistributedSampler and mosaicml-streaming, side by side.

For each dataset size N and implementation, a fresh subprocess (so peak memory is its own):
  resume_ms      time from "resume at sample N/2" to having this rank's first batch in hand
                 (torch has no resume: a user builds the iterator and skips ahead; streaming
                 builds the epoch's sample arrangement from `sample_in_epoch`, which its local
                 rank 0 does and shares with the node's ranks)
  batch_us       median cost of each following rank batch
  ids_per_s      rank ids per second at the median batch cost
  peak_rss_mb    peak resident memory above the interpreter baseline (VmHWM - VmRSS at start)
Both libraries are warmed up on a tiny instance first, so resume_ms is the algorithm, not imports.
Plus a shuffle-quality table at N = 10**6 against torch.randperm: |corr(position, id)| (0 = no
trend), the median |id difference| of neighbouring samples over N (locality; ~0.29 for an ideal
shuffle), and how many 10**4-sequence blocks a batch of 1000 touches (what the node cache holds).

mosaicml-streaming (a bench-only extra: `pip install --no-deps mosaicml-streaming`) is measured
through the two public pieces that decide a rank's sample ids, exactly as its `random` batching
combines them: `streaming.base.partition.get_partitions` (algo "relaxed") over
`streaming.base.shuffle.get_shuffle` (algo "py1e"), with its defaults for one node of 8 ranks
(1 canonical node, shuffle block 4,000,000) and shards of 100,000 samples (our block size). Both
are numpy-only; the `streaming` package's own `__init__` imports its whole dataset stack
(transformers, torchvision, ...), which cannot be installed next to this CPU torch, so the two
subpackages are loaded under a bare parent package. Without mosaicml-streaming its rows are
skipped with a one-line message.

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

import numpy as np

GLOBAL_BATCH, WORLD, RANK, BATCHES = 4096, 8, 3, 100  # 100 batches fit after N/2 at N = 10**6


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


STREAMING_SHARD, STREAMING_BLOCK = 100_000, 4_000_000  # shard size = our block size; its default block


def streaming_pieces():
    """(get_partitions, get_shuffle) from mosaicml-streaming, or ImportError saying why not."""
    import importlib.util
    import types

    spec = sys.modules["streaming"].__spec__ if "streaming" in sys.modules else importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mosaicml-streaming is not installed (pip install --no-deps mosaicml-streaming)")
    root = spec.submodule_search_locations[0]
    for name, path in (("streaming", root), ("streaming.base", os.path.join(root, "base"))):
        if name not in sys.modules:  # a bare package: its __init__ would import the dataset stack
            module = types.ModuleType(name)
            module.__path__, module.__spec__ = [path], spec if name == "streaming" else None
            sys.modules[name] = module
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle

    return get_partitions, get_shuffle


def streaming_ids(n: int, world: int, batch: int, drop_first: int, *, shard: int, block: int) -> np.ndarray:
    """streaming's sample ids for the rest of epoch 0 from `drop_first` on: (world, batches, batch),
    the partition mapped through the shuffle as its `generate_work_random_batching` does."""
    get_partitions, get_shuffle = streaming_pieces()
    part = get_partitions("relaxed", n, 1, 1, world, 1, batch, drop_first)  # (node, rank, worker, batches, batch)
    shuffle = get_shuffle("py1e", np.full(n // shard, shard, np.int64), 1, 0, 0, block)
    return np.where(part != -1, shuffle[part], -1)[0, :, 0]


class _Len:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def case(impl: str, n: int) -> dict:
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
    elif impl == "streaming-py1e":
        streaming_ids(10**4, 2, 4, 0, shard=1000, block=2000)  # warm up (imports, first calls)
        base = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        rank_ids = streaming_ids(n, WORLD, per_rank, start_step * GLOBAL_BATCH, shard=STREAMING_SHARD,
                                 block=STREAMING_BLOCK)[RANK]
        first = rank_ids[0].copy()
        resume = time.perf_counter() - t0
        for k in range(1, BATCHES + 1):
            t = time.perf_counter()
            batch = rank_ids[k].copy()
            times.append(time.perf_counter() - t)
        assert len(first) == len(batch) == per_rank and first.min() >= 0
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
    del torch
    med = statistics.median(times)
    return {
        "resume_ms": resume * 1e3,
        "batch_us": med * 1e6,
        "ids_per_s": per_rank / med,
        "peak_rss_mb": (_rss_kb("VmHWM") - base) / 1024,
    }


def quality() -> dict:
    """Shuffle quality at N = 10**6, one epoch, against torch.randperm."""
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
    try:
        streaming_pieces()
    except ImportError:
        return out
    for block in (STREAMING_BLOCK, 1 << 18):  # its default here, and its smallest default
        ids = streaming_ids(n, 1, b, 0, shard=10_000, block=block).reshape(-1)
        out[f"streaming-py1e(10k shards, block {block})"] = stats(ids, 10_000)
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
    try:
        streaming_pieces()
        plan += [("streaming-py1e", n) for n in (10**6, 10**8)]  # O(N) arrays: 10**9 needs tens of GB
    except ImportError as e:
        print(f"streaming: skipped ({e})", flush=True)
    if a.quick:
        plan = [(impl, n) for impl, n in plan if n <= 10**6]
    results: dict = {}
    for impl, n in plan:
        repeats = a.repeats if impl != "streaming-py1e" or n < 10**8 else min(a.repeats, 3)  # ~40 s, 3.4 GB each
        runs = [run_child(["--case", impl, str(n)]) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": len(runs)}
        results[f"{impl} N=1e{len(str(n)) - 1}"] = med
        print(f"{impl:14s} N=1e{len(str(n)) - 1:<3d} resume {med['resume_ms']:10.3f} ms  batch {med['batch_us']:9.1f} us  "
              f"{med['ids_per_s'] / 1e6:7.2f} M ids/s  peak +{med['peak_rss_mb']:8.1f} MB", flush=True)
    q = run_child(["--quality"])
    for name, row in q.items():
        print(f"quality {name:42s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "global_batch": GLOBAL_BATCH, "world": WORLD, "repeats": a.repeats,
        "results": results, "quality": q,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
