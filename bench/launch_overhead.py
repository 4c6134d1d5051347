"""Per-step time of `orchestrator launch` vs a bare torch DDP loop, side by side in one run.

A: a bare loop a user would write: torch.multiprocessing.spawn, gloo over tcp://127.0.0.1,
   the same GPT, data, sampler, AdamW, LR schedule and clipping as configs/demo.yaml.
B: our real launch path: `orchestrator launch configs/demo.yaml` in a subprocess (embedded Ray,
   placement group, actors, metrics actor, store); step times are read back with
   `orchestrator metrics --json`.

Runs alternate A B B A A B ... so machine noise and drift hit both alike; we report medians.
Both time a step the same way (time between consecutive step ends) and skip the first --warmup
steps. The loss curves are compared too: same seed and data should give the same losses.
CPU seconds are recorded as well: per step and rank on both sides (bare: process_time over the
timed steps; ours: the slope of each rank's `sys/process_cpu_s` against the step), and, per
process, the cores each one used while the run trained (steps warmup .. steps-11) and its lifetime
total: each rank (found by the pid its worker reported, bench/proc_sampler.py), each of our run
actors, the driver, and each Ray daemon. On a shared machine CPU seconds move far less with the
load than step times do. `--set scaling.num_workers=1` leaves a core free for everything beside
the ranks: what remains is in-rank overhead.

Prints progress to stderr and one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run as a script, or imported as bench.NAME by Ray workers (a model factory): benchlib is beside us
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_state, machine  # noqa: E402
from proc_sampler import ProcSampler  # noqa: E402

BIN = Path(sys.executable).parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- A: the bare torch DDP loop --------------------------------------------------------------


def lr_at(step: int, o, total: int) -> float:
    """Linear warmup, then cosine to lr * min_lr_ratio (the schedule our docs describe)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def bare_worker(rank: int, world: int, port: int, cfg, warmup: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dataloading.dataset import TokenDataset
    from dataloading.sampler import GlobalSampler
    from orchestrator.gpt import build_model

    torch.set_num_threads(cfg.scaling.torch_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    data = TokenDataset(cfg.data.uri, "train")
    vocab = json.loads(Path(cfg.data.uri, "index.json").read_text())["vocab_size"]
    seq_len = data.batch([0]).shape[1]
    model = build_model(cfg.model, vocab_size=vocab, block_size=seq_len - 1)
    ddp = DDP(model) if world > 1 else model  # as ours: one rank is not wrapped (no reducer to run)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2),
    )
    sampler = GlobalSampler(len(data), cfg.data.global_batch_size, cfg.run.seed)
    torch.manual_seed(cfg.run.seed * 1000 + rank + 1)  # per-rank dropout stream, as ours
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")

    steps = cfg.train.max_steps
    losses, times, ends = [], [], []
    last = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            cpu0 = time.process_time()  # this rank's CPU per step: a figure other tenants barely move
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o, steps)
        batch = data.batch(sampler.local_batch(step, rank, world))
        x, y = batch[:, :-1], batch[:, 1:]
        logits = ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
        now = time.perf_counter()
        times.append(now - last)
        ends.append(time.time())  # when each step ended: the window the per-process CPU is read over
        last = now
    cpu_per_step = (time.process_time() - cpu0) / (steps - warmup)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"loss": losses, "step_time_s": times, "step_end": ends,
                                                             "cpu_s_per_step": cpu_per_step,
                                                             "cpu_s_total": time.process_time()}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bare(cfg, world: int, warmup: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    out_dir = Path(tempfile.mkdtemp(prefix="bare-", dir=tmp))
    # Same transport as our workers use on a loopback cluster (rendezvous.join sets it).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.perf_counter()
    ctx = mp.start_processes(bare_worker, args=(world, free_port(), cfg, warmup, str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    ranks_by_pid = {p.pid: f"rank{r}" for r, p in enumerate(ctx.processes)}
    sampler = ProcSampler(None, named=lambda: ranks_by_pid).start()  # the same sampling as ours gets
    try:
        while not ctx.join():
            pass
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    ends = ranks[0]["step_end"]
    steps = len(ends)
    return {"wall_s": wall, "step_time_s": [r["step_time_s"] for r in ranks], "loss": ranks[0]["loss"],
            "cpu_s_per_step": [r["cpu_s_per_step"] for r in ranks], "cpu_s_total": [r["cpu_s_total"] for r in ranks],
            "procs": per_process(sampler, (ends[warmup], ends[steps - 11]))}


# --- B: our launch path ------------------------------------------------------------------------


def cli_json(args: list[str], env: dict) -> object:
    cmd = [str(BIN / "orchestrator"), *args, "--json"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench: `{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def run_ours(config: str, overrides: list[str], name: str, world: int, home: Path, warmup: int, steps: int) -> dict:
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)  # always the embedded cluster, like `make demo`
    cmd = [str(BIN / "orchestrator"), "launch", config, *overrides, f"run.name={name}"]
    t0 = time.perf_counter()
    run = RunRecord(home / "store.db", name)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
        sampler = ProcSampler(proc.pid, named=run.worker_pids, progress=run.steps_done).start()
        try:
            proc.wait()
        finally:
            sampler.stop()
            run.close()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"bench: `{' '.join(cmd)}` failed ({proc.returncode}):\n{err.read()[-2000:]}")
    run_id = next(r["id"] for r in cli_json(["runs"], env) if r["name"] == name)

    def points(key: str, rank: int) -> list[tuple[int, float]]:
        got = cli_json(["metrics", run_id, "--key", key, "--rank", str(rank)], env)["points"]
        return sorted((p["step"], p["value"]) for p in got)

    def series(key: str, rank: int) -> list[float]:
        return [v for _, v in points(key, rank)]

    return {
        "wall_s": wall,
        "run_id": run_id,
        "step_time_s": [series("train/step_time_s", r) for r in range(world)],
        "loss": series("train/loss", 0),
        "cpu_s_total": ranks_vs_rest(sampler.totals()),
        "procs": per_process(sampler, sampler.window(warmup, steps - 11)),
        "ranks_found": sorted(run.pids.values()),
        "cpu_s_per_step": [cpu_per_step(points("sys/process_cpu_s", r), warmup) for r in range(world)],
    }


class RunRecord:
    """What the run being launched has recorded in its store, read directly (read-only SQLite, a
    query a second; no CLI process that would compete with the run): its ranks' worker pids, as
    each worker reported os.getpid() at start, and how many steps rank 0 has logged."""

    def __init__(self, db: Path, name: str):
        self.path, self.name = db, name
        self.db: sqlite3.Connection | None = None
        self.run_id: str | None = None
        self.pids: dict[int, str] = {}

    def _open(self) -> sqlite3.Connection | None:
        if self.db is None and self.path.exists():
            self.db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        return self.db

    def worker_pids(self) -> dict[int, str]:
        if not self.pids and (db := self._open()) is not None:
            row = db.execute("SELECT id, meta FROM runs WHERE name = ? ORDER BY created_at DESC LIMIT 1",
                             (self.name,)).fetchone()
            if row:
                self.run_id = row[0]
                workers = json.loads(row[1] or "{}").get("workers", [])
                self.pids = {w["pid"]: f"rank{w['rank']}" for w in workers}
        return self.pids

    def steps_done(self) -> int | None:
        if self.run_id is None or self.db is None:
            return None
        row = self.db.execute("SELECT MAX(n) FROM series WHERE run_id = ? AND key = 'train/loss' AND rank = 0",
                              (self.run_id,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def ranks_vs_rest(totals: dict[str, float]) -> dict[str, float]:
    ranks = sum(v for k, v in totals.items() if k.startswith("rank"))
    return {"train_workers": ranks, "other": sum(totals.values()) - ranks}


def per_process(sampler: ProcSampler, window: tuple[float, float] | None) -> dict:
    """Cores per process while training (the window), and lifetime CPU seconds per process."""
    cores = sampler.cores(*window) if window else {}
    side = sum(v for k, v in cores.items() if not k.startswith("rank"))
    return {"window_s": window[1] - window[0] if window else None,
            "cores": {k: round(v, 4) for k, v in sorted(cores.items())},
            "side_cores": round(side, 4) if window else None,
            "cpu_s": {k: round(v, 2) for k, v in sorted(sampler.totals().items())}}


def cpu_per_step(samples: list[tuple[int, float]], warmup: int) -> float | None:
    """CPU seconds per step of a rank from its cumulative `sys/process_cpu_s` samples (step, s):
    the slope between the first sample at or past `warmup` and the last one before the end
    (the last may be taken during teardown). None when fewer than two samples span steps."""
    usable = [(s, c) for s, c in samples if s >= warmup]
    if len(usable) > 2:
        usable = usable[:-1]
    if len(usable) < 2 or usable[-1][0] == usable[0][0]:
        return None
    return (usable[-1][1] - usable[0][1]) / (usable[-1][0] - usable[0][0])


# --- the comparison ----------------------------------------------------------------------------


def median_cores(procs: list[dict]) -> dict[str, float]:
    labels = sorted({k for p in procs for k in p["cores"]})
    return {k: round(statistics.median(p["cores"].get(k, 0.0) for p in procs), 4) for k in labels}


def fmt_cores(procs: dict) -> str:
    if procs["side_cores"] is None:
        return "n/a (no training window seen)"
    ranks = " ".join(f"{k}={v:.3f}" for k, v in procs["cores"].items() if k.startswith("rank"))
    return f"{ranks} beside the ranks={procs['side_cores']:.3f}"


def ensure_data(uri: Path) -> None:
    if (uri / "index.json").exists():
        return
    stdlib = sysconfig.get_paths()["stdlib"]
    log(f"preparing demo data from {stdlib} into {uri}")
    subprocess.run([str(BIN / "orchestrator"), "data", "prepare", stdlib, "--out", str(uri), "--include", "*.py"],
                   cwd=ROOT, check=True, stdout=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="recipe both sides train (relative to the repo)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each side, alternated")
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the step-time medians")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (stores, per-rank JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both sides, e.g. scaling.num_workers=1 (repeatable)")
    args = p.parse_args()
    if args.steps <= args.warmup + 1:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup} + 1")

    from orchestrator.config import load_config

    cfg0 = load_config(ROOT / args.config)
    data_uri = (ROOT / cfg0.data.uri).resolve()
    ensure_data(data_uri)
    overrides = [f"train.max_steps={args.steps}", "train.eval_every=0", "cluster.dashboard=false",
                 f"data.uri={data_uri}", *args.set]
    cfg = load_config(ROOT / args.config, overrides)  # the bare loop gets exactly what ours resolves
    world = cfg.scaling.num_workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    log(f"{args.repeats} x (bare, ours), {args.steps} steps, {world} ranks, warmup {args.warmup}; tmp {tmp}")

    results: dict[str, list[dict]] = {"bare": [], "ours": []}
    try:
        for i in range(args.repeats):
            for side in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
                load = os.getloadavg()[0]
                if side == "bare":
                    r = run_bare(cfg, world, args.warmup, tmp)
                else:
                    r = run_ours(args.config, overrides, f"bench-{i}", world, tmp / "home", args.warmup, args.steps)
                r["median_step_s"] = [statistics.median(t[args.warmup:]) for t in r["step_time_s"]]
                r["loadavg"] = load
                results[side].append(r)
                log(f"repeat {i + 1}/{args.repeats} {side:4s}: median step "
                    + " ".join(f"r{k}={m * 1e3:.1f}ms" for k, m in enumerate(r["median_step_s"]))
                    + " cpu/step " + " ".join("n/a" if c is None else f"{c * 1e3:.1f}ms" for c in r["cpu_s_per_step"])
                    + f", wall {r['wall_s']:.1f}s, last loss {r['loss'][-1]:.4f}, load {load:.1f}"
                    + f"; cores {fmt_cores(r['procs'])}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def side_summary(runs: list[dict]) -> dict:
        return {
            "median_step_s_rank0": [r["median_step_s"][0] for r in runs],
            "median_step_s_rank1": [r["median_step_s"][1] for r in runs] if world > 1 else [],
            "median_step_s": statistics.median(r["median_step_s"][0] for r in runs),
            "wall_s": [r["wall_s"] for r in runs],
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "loadavg_at_start": [r["loadavg"] for r in runs],
            # lifetime CPU seconds (startup included): bare per rank; ours train workers vs the rest
            "cpu_s_total": [r["cpu_s_total"] for r in runs],
            "cpu_s_per_step": [r["cpu_s_per_step"] for r in runs],  # per repeat, per rank
            # per process: cores while training (median over repeats) and each repeat's figures
            "cores_median": median_cores([r["procs"] for r in runs]),
            "side_cores": [r["procs"]["side_cores"] for r in runs],
            "procs": [r["procs"] for r in runs],
        }

    bare, ours = side_summary(results["bare"]), side_summary(results["ours"])
    ratio = ours["median_step_s"] / bare["median_step_s"]
    # Paired per repeat too: each ours run against the bare run next to it.
    paired = [o / b for o, b in zip(ours["median_step_s_rank0"], bare["median_step_s_rank0"], strict=True)]
    # CPU seconds per step of a bare rank (process_time): the work in one step, whatever the load.
    bare_cpu = statistics.median(c for r in results["bare"] for c in r["cpu_s_per_step"])
    ours_cpu_all = [c for r in results["ours"] for c in r["cpu_s_per_step"] if c is not None]
    ours_cpu = statistics.median(ours_cpu_all) if ours_cpu_all else None

    def max_diff(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    pairs = list(zip(results["ours"], results["bare"], strict=True))
    loss = {
        # rank 0's train/loss, ours vs the bare run of the same repeat
        "ours_vs_bare_max_abs": max(max_diff(o["loss"], b["loss"]) for o, b in pairs),
        # nonzero here means the code under test changed during the bench, not nondeterminism
        "across_repeats_max_abs": max(max_diff(r["loss"], results["bare"][0]["loss"]) for r in results["bare"]),
        "first_last_loss": [results["bare"][-1]["loss"][0], results["bare"][-1]["loss"][-1]],
    }
    summary = {
        "bench": "launch_overhead",
        "config": args.config,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "world_size": world,
        "bare": bare,
        "ours": ours,
        "ratio": ratio,
        "ratio_paired": paired,
        "ratio_paired_median": statistics.median(paired),
        "bare_cpu_s_per_step": bare_cpu,
        # a rank's CPU seconds per step, ours (every rank of every repeat, median) over bare's
        "ours_cpu_s_per_step": ours_cpu,
        "cpu_ratio": ours_cpu / bare_cpu if ours_cpu is not None else None,
        # cores used beside the ranks while training (our actors, driver, Ray daemons), median over repeats
        "side_cores_median": statistics.median(c for c in ours["side_cores"] if c is not None)
        if any(c is not None for c in ours["side_cores"]) else None,
        "overrides": args.set,
        "uptime_load": os.getloadavg(),
        "target_ratio": 1.03,
        "within_target": ratio <= 1.03,
        "loss": loss,
        "git": git_state(),
        "machine": machine(),
    }
    cpu_note = f"{ours_cpu / bare_cpu:.3f}" if ours_cpu is not None else "n/a"
    log(f"ratio ours/bare = {ratio:.3f} (paired {', '.join(f'{x:.3f}' for x in paired)}); CPU/step ratio {cpu_note}; "
        f"loss max |diff| ours vs bare = {loss['ours_vs_bare_max_abs']:.3g}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
