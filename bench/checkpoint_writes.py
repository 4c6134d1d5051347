"""Checkpoint writes to a throttling object store: ours vs every rank writing at once, one run.

R simulated ranks (threads) each write one shard of S MB to a moto S3 server on 127.0.0.1 behind
our fault proxy, which answers 503 SlowDown to any write above --cap in flight (a store's
throttling). Compared, side by side, on the same store:

  ours       FileWriter: coordinator slots (max_concurrent_writes=cap), jittered starts, retries
             with backoff, stored size checked; then the manifest (commit)
  plain_put  every rank calls fs.pipe_file at once, s3fs/botocore default retries
  dcp        every rank calls torch.distributed.checkpoint.save with its FsspecWriter at once

Reports per mode: success rate (shards stored), committed (all shards), total time, peak
concurrent writes seen by the store, 503s served. The bandwidth bound is the time to move the
same bytes at the throughput of `cap` concurrent writers with no throttling, measured in every
round (the machine is shared and drifts); ratios to it are per round, medians reported.

Also: the training stall of Checkpointer.save vs a synchronous torch.save + put of the same state
(the demo model), medians of --repeats.

Prints progress to stderr and one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def start_store():
    import socket

    from moto.server import ThreadedMotoServer

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, ("127.0.0.1", port)


def new_bucket(upstream) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=f"http://{upstream[0]}:{upstream[1]}", region_name="us-east-1").create_bucket(
        Bucket=name)
    return name


def s3fs_for(url: str, *, quiet_retries: bool):
    import fsspec

    from tests.s3_server import storage_options

    opts = storage_options(url)
    if not quiet_retries:  # a plain user: s3fs and botocore defaults
        opts.pop("config_kwargs")
    fs, _ = fsspec.core.url_to_fs("s3://x", **opts)
    if quiet_retries:
        fs.retries = 1
    return fs, opts


def in_threads(n: int, fn) -> list:
    out: list = [None] * n

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return out


def mode_ours(proxy, bucket, shard: bytes, ranks: int, cap: int):
    from actors.checkpoint_coordinator import CheckpointCoordinator
    from checkpointing import manifest
    from checkpointing.client import LocalClient
    from checkpointing.config import CheckpointConfig
    from checkpointing.writer import FileWriter

    fs, _ = s3fs_for(proxy.url, quiet_retries=True)
    cfg = CheckpointConfig(max_concurrent_writes=cap, per_node_writes=cap, retries=8, backoff_s=0.1)
    client = LocalClient(CheckpointCoordinator("bench", bucket, ranks, max_concurrent_writes=cap,
                                               per_node_writes=cap, slot_lease_s=600))
    root = f"{bucket}/ours/step_00000001"

    def write(r):
        w = FileWriter(fs, client, rank=r, node=f"node{r // 8}", cfg=cfg)
        listed = manifest.entry(f"shard_{r:05d}", shard, r).to_dict()  # as the Checkpointer: hash, then write
        w.write(f"{root}/shard_{r:05d}", shard)
        return listed

    results = in_threads(ranks, write)
    ok = [r for r in results if isinstance(r, dict)]
    if len(ok) == ranks:
        m = manifest.build(step=1, run_id="bench", world_size=ranks, files=ok)
        FileWriter(fs, client, rank=0, node="node0", cfg=cfg).write(f"{root}/MANIFEST.json", manifest.encode(m))
    return len(ok), [r for r in results if isinstance(r, Exception)]


def mode_plain(proxy, bucket, shard: bytes, ranks: int, cap: int):
    fs, _ = s3fs_for(proxy.url, quiet_retries=False)
    results = in_threads(ranks, lambda r: [fs.pipe_file(f"{bucket}/plain/shard_{r:05d}", shard), True][1])
    return sum(1 for r in results if r is True), [r for r in results if isinstance(r, Exception)]


def mode_dcp(proxy, bucket, shard: bytes, ranks: int, cap: int):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    _, opts = s3fs_for(proxy.url, quiet_retries=False)
    opts = {k: v for k, v in opts.items() if k != "skip_instance_cache"}
    tensor = torch.frombuffer(bytearray(shard), dtype=torch.uint8)

    def save(r):
        writer = FsspecWriter(f"s3://{bucket}/dcp/rank_{r:05d}", **opts)
        dcp.save({"shard": tensor}, storage_writer=writer, no_dist=True)
        return True

    results = in_threads(ranks, save)
    return sum(1 for r in results if r is True), [r for r in results if isinstance(r, Exception)]


def bandwidth_bound(proxy, bucket, shard: bytes, ranks: int, cap: int) -> float:
    """Seconds to move ranks*shard bytes at the throughput of `cap` writers, store not throttling."""
    fs, _ = s3fs_for(proxy.url, quiet_retries=True)
    proxy.state.cap = None
    t0 = time.perf_counter()
    in_threads(cap, lambda i: fs.pipe_file(f"{bucket}/bw/{i}", shard, max_concurrency=1))
    per_wave = time.perf_counter() - t0
    return per_wave * ranks / cap


def stall(repeats: int, proxy, bucket) -> dict:
    import torch

    from actors.checkpoint_coordinator import CheckpointCoordinator
    from checkpointing.client import LocalClient
    from checkpointing.config import CheckpointConfig
    from checkpointing.writer import Checkpointer
    from orchestrator.config import load_config
    from orchestrator.gpt import build_model
    from orchestrator.gpt_function import loss_of, make_optimizer

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    model = build_model(cfg.model, vocab_size=256, block_size=128)
    opt = make_optimizer(model, cfg)
    loss_of(model, torch.randint(0, 256, (4, 129))).backward()
    opt.step()
    fs, _ = s3fs_for(proxy.url, quiet_retries=True)
    root = f"{bucket}/stall"
    ck = Checkpointer(fs=fs, root=root, client=LocalClient(CheckpointCoordinator(
        "bench", root, 1, max_concurrent_writes=8, per_node_writes=8, slot_lease_s=60)), rank=0, world_size=1,
        run_id="bench", config=cfg.to_dict(), cfg=CheckpointConfig(start_jitter_s=0))
    blocked, upload, sync = [], [], []
    for i in range(1, repeats + 1):
        t = time.perf_counter()
        ck.save(i, model=model, optimizer=opt, sampler_state={})
        blocked.append(time.perf_counter() - t)
        ck.close()
        upload.append(ck.results[-1].upload_s)
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
        fs.pipe_file(f"{bucket}/sync/{i}.pt", buf.getvalue())
        sync.append(time.perf_counter() - t)
    b, u, s = statistics.median(blocked), statistics.median(upload), statistics.median(sync)
    return {"model_params": sum(p.numel() for p in model.parameters()), "bytes": ck.results[-1].bytes,
            "blocked_s": b, "upload_s": u, "sync_save_s": s, "stall_ratio": b / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--shard-mb", type=float, default=64)
    ap.add_argument("--cap", type=int, default=4, help="the store answers 503 above this many writes")
    ap.add_argument("--repeats", type=int, default=5, help="stall measurements")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the write comparison (medians reported)")
    ap.add_argument("--modes", default="ours,plain_put,dcp")
    args = ap.parse_args()

    import torch.distributed.checkpoint  # noqa: F401  (imports outside the timed regions)

    import checkpointing.writer  # noqa: F401
    from tests.s3_server import FaultProxy

    server, upstream = start_store()
    shard = os.urandom(int(args.shard_mb * 2**20))
    out = {"bench": "checkpoint_writes", "ranks": args.ranks, "shard_mb": args.shard_mb, "cap": args.cap,
           "modes": {}}
    try:
        proxy = FaultProxy(upstream)
        bucket = new_bucket(upstream)
        modes = {"ours": mode_ours, "plain_put": mode_plain, "dcp": mode_dcp}
        names = [n for n in args.modes.split(",") if n]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        bounds = []
        for round_ in range(args.rounds):
            bounds.append(bandwidth_bound(proxy, bucket, shard, args.ranks, args.cap))  # per round: the machine drifts
            log(f"round {round_ + 1} bandwidth bound {bounds[-1]:.2f}s")
            order = names if round_ % 2 == 0 else names[::-1]  # alternate so drift hits all modes alike
            for name in order:
                proxy.state.reset_counters()
                proxy.state.cap = args.cap
                t0 = time.perf_counter()
                ok, errors = modes[name](proxy, new_bucket(upstream), shard, args.ranks, args.cap)
                took = time.perf_counter() - t0
                res = {"stored": ok, "total_s": took, "vs_bound": took / bounds[-1],
                       "peak_concurrent_writes": proxy.state.peak,
                       "slowdowns_served": proxy.state.served.get("cap", 0),
                       "first_error": f"{type(errors[0]).__name__}: {str(errors[0])[:120]}" if errors else None}
                runs[name].append(res)
                log(f"round {round_ + 1} {name}: {json.dumps(res)}")
        out["bandwidth_bound_s_median"] = statistics.median(bounds)
        for name, rs in runs.items():
            total = statistics.median(r["total_s"] for r in rs)
            out["modes"][name] = {
                "success_rate": sum(r["stored"] for r in rs) / (args.ranks * len(rs)),
                "committed_rounds": sum(r["stored"] == args.ranks for r in rs), "rounds": len(rs),
                "total_s_median": total, "vs_bound_median": statistics.median(r["vs_bound"] for r in rs),
                "peak_concurrent_writes_max": max(r["peak_concurrent_writes"] for r in rs),
                "slowdowns_served_total": sum(r["slowdowns_served"] for r in rs),
                "first_error": next((r["first_error"] for r in rs if r["first_error"]), None),
            }
        proxy.state.cap = None
        out["stall"] = stall(args.repeats, proxy, new_bucket(upstream))
        log(f"stall: {json.dumps(out['stall'])}")
        proxy.close()
    finally:
        server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
