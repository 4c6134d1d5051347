"""The control plane at scale: N simulated ranks against the real run actors, on several Ray nodes.

Each simulated rank makes the actor calls a real rank's side threads make, on their schedule: a
heartbeat every hang.heartbeat_s, a metrics flush every telemetry.flush_every_s with 50 keys
logged per step (the built-in loop's train/* and health/compute_s among them, so the anomaly and
straggler detectors do their real work), and at every checkpoint one shard write (jittered
start, a write slot from the coordinator, the write simulated by a sleep of --write-s, release).
The ranks of a node live in one host actor on that node: asyncio tasks on fixed timers
(bench/control_plane_sim.py, the default), or `--sim threads`, the real Heartbeat, MetricSender
and FileWriter threads, 2+ per rank (bench/control_plane_threads.py; it starves 2 cores at 1,024
ranks and is kept for the before/after comparison). `--aggregate`: each host also plays its
node's aggregator, one heartbeat call and one metrics call per node a tick (async sim only).
`--relay`: each node gets the product's relay (actors/node_relay.py, as the worker group starts
it under telemetry.relay); the simulated ranks call it per rank and it calls the run's actors once
a tick (async sim only).

Against them, the real HealthMonitor, MetricsActor (+ the SQLite tracking store and the anomaly
detector) and CheckpointCoordinator, on the head node as the worker group places them, and the
real watchdog (orchestrator/hang/watchdog.py) run by this process once a controller tick.

At a random moment one rank freezes (as under SIGSTOP: its heartbeats and its training stop);
the other ranks then wait in a collective (their progress stops, their heartbeats go on).

Figures (JSON on the last line):
  heartbeat_age_p99_s  age of each live rank's latest heartbeat in the HealthMonitor, by its own
                       clock when the watchdog's tick reads it (heartbeat_age_watchdog_p99_s: once
                       the answer is back in the driver, which the watchdog judges by)
  sim_late_p99_s       how far behind their own schedule the simulated ranks' timers fired (large:
                       the figures measure a starved simulator, not the control plane)
  ingest_lag_p99_s     a point logged (its value is the wall time it was logged) -> readable from
                       the store, for a sample of ranks polled every 0.25 s (so up to 0.25 s high)
  points_sent / points_stored  every point logged vs every point in the store at the end
  slot_grant_p99_s     a write's first slot request -> its grant (the cap makes this grow with N)
  slots_peak / slot_cap  most writes in flight at once (from the writes' own start/end times)
  frozen_rank_named_s  freeze -> the stall event naming that rank (null if it was never named)
  cpu_s                CPU seconds of each actor over the run (psutil, by pid)

  python bench/control_plane.py --ranks 1024 [--nodes 8] [--duration-s 60] [--sim async|threads] [--aggregate|--relay]

Only processes this script starts are stopped (the Cluster's raylets); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import control_plane_sim  # noqa: E402
import control_plane_threads  # noqa: E402
from control_plane_sim import KEYS  # noqa: E402


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3)


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start
    peak = now = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    import psutil

    out = {}
    for name, ps in pids.items():
        total = 0.0
        for pid in ps:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


class LagProbe(threading.Thread):
    """Reads the store as a user's query would, every 0.25 s: for a sample of ranks, the
    `bench/sent_at` points not seen yet; a point's lag = when it was first readable - its value."""

    def __init__(self, root: str, run_id: str, sample: list[int]):
        super().__init__(name="lag-probe", daemon=True)
        self.root, self.run_id, self.sample = root, run_id, sample
        self.lags: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        from orchestrator.store import Store

        store = Store(self.root)
        last = dict.fromkeys(self.sample, -1)
        sids: dict[int, int] = {}
        while not self.done.wait(0.25):
            if len(sids) < len(self.sample):
                sids = {rank: sid for sid, rank, _, _ in store.points.find(self.run_id, "bench/sent_at")
                        if rank in last}
            now = time.time()
            for rank, sid in sids.items():
                pts = store.points.read(sid, lo=last[rank] + 1)
                if len(pts.steps):
                    self.lags.extend(now - float(v) for v in pts.values)
                    last[rank] = int(pts.steps[-1])
        store.close()


def run(ranks: int, nodes: list[str], *, root: str, duration_s: float = 60.0, step_s: float = 1.0,
        heartbeat_s: float | None = None, flush_every_s: float | None = None, ckpt_every: int = 15,
        write_s: float = 0.02, seed: int = 0, sim: str = "async", aggregate: bool = False,
        relay: bool = False, verbose: bool = False) -> dict:
    """One measurement on a connected Ray cluster; `nodes`: the Ray node ids to spread ranks over
    (the run's actors go on the first, as the worker group places them next to the store).
    sim: "async" (control_plane_sim.py) or "threads" (control_plane_threads.py)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors import checkpoint_coordinator
    from actors.checkpoint_coordinator import CheckpointCoordinator
    from actors.health import HealthMonitor
    from actors.metrics_actor import MetricsActor
    from checkpointing.config import CheckpointConfig
    from orchestrator.anomaly import AnomalyDetector
    from orchestrator.config import HangConfig, TelemetryConfig
    from orchestrator.hang.watchdog import Watchdog
    from orchestrator.store import Store

    if sim not in ("async", "threads") or ((aggregate or relay) and sim != "async") or (aggregate and relay):
        raise ValueError(f"sim must be 'async' or 'threads' (aggregate or relay, not both: async only), got {sim!r}, "
                         f"aggregate={aggregate}, relay={relay}")
    # Ray's workers cannot import bench/: ship the simulators' code (and this module's, when imported)
    for module in (control_plane_sim, control_plane_threads, *([sys.modules[__name__]] if __name__ != "__main__" else [])):
        ray.cloudpickle.register_pickle_by_value(module)
    rng = random.Random(seed)
    hang = HangConfig(**({"heartbeat_s": heartbeat_s} if heartbeat_s else {}))
    flush_every_s = flush_every_s or TelemetryConfig().flush_every_s
    ck = CheckpointConfig()
    run_id = f"cp{ranks}-{int(time.time())}"
    store = Store(root)
    store.create_run(run_id=run_id, name="control-plane", config={}, git_commit=None, host="bench",
                     command="bench/control_plane.py", world_size=ranks)
    # as the worker group creates them (the code before bench/control_plane.py's fixes had no such option)
    calls = {"max_concurrency": checkpoint_coordinator.max_calls(ranks)} if hasattr(checkpoint_coordinator, "max_calls") else {}
    on = lambda node, **kw: dict(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), **kw)  # noqa: E731
    head = nodes[0]
    metrics = ray.remote(MetricsActor).options(**on(head, num_cpus=0, **calls)).remote(
        run_id, root, open_store=Store, detector=AnomalyDetector())
    monitor = ray.remote(HealthMonitor).options(**on(head, num_cpus=0)).remote()
    coordinator = ray.remote(CheckpointCoordinator).options(**on(head, num_cpus=0, **calls)).remote(
        run_id, str(Path(root) / "ckpt"), ranks, max_concurrent_writes=ck.max_concurrent_writes,
        per_node_writes=ck.per_node_writes, slot_lease_s=ck.slot_lease_s, store_root=root)
    actors = {"metrics_actor": metrics, "health_monitor": monitor, "checkpoint_coordinator": coordinator}
    ray.get([a.__ray_call__.remote(lambda self: None) for a in actors.values()], timeout=120)

    per = [list(range(ranks))[i::len(nodes)] for i in range(len(nodes))]  # round-robin: node i has ranks i, i+n, ...
    node_of = {r: nodes[i] for i, rs in enumerate(per) for r in rs}
    frozen = rng.randrange(ranks)
    freeze_frac = rng.uniform(0.6, 0.8)
    plan = {"step_s": step_s, "heartbeat_s": hang.heartbeat_s, "flush_every_s": flush_every_s,
            "ckpt_every": ckpt_every, "write_s": write_s, "frozen_rank": frozen,
            "seed": seed, "aggregate": aggregate, "start_jitter_s": ck.start_jitter_s,
            "commit_timeout_s": ck.commit_timeout_s}
    host_class, concurrency = ((control_plane_sim.AsyncRankHost, 1000) if sim == "async"
                               else (control_plane_threads.RankHost, 4))
    relays = None
    if relay:  # as the worker group starts them: the product's code
        from actors.node_relay import Relays

        relays = Relays(f"control-plane:{run_id}")
        relays.start(list(dict.fromkeys(n for n, rs in zip(nodes, per, strict=True) if rs)), attempt=0, monitor=monitor, metrics=metrics,
                     heartbeat_s=hang.heartbeat_s, flush_every_s=flush_every_s)
    hosts = [ray.remote(host_class).options(**on(n, num_cpus=0, max_concurrency=concurrency)).remote(
        rs, n, plan, monitor=monitor, metrics=metrics, coordinator=coordinator,
        **({"relay": relays.of(n)} if relays else {})) for n, rs in zip(nodes, per, strict=True) if rs]
    pids = {k: [ray.get(a.__ray_call__.remote(lambda self: os.getpid()))] for k, a in actors.items()}
    if relays:
        pids["relays"] = ray.get([r.__ray_call__.remote(lambda self: os.getpid()) for r in relays.by_node.values()],
                                 timeout=300)
    pids["rank_hosts"] = ray.get([h.pid.remote() for h in hosts], timeout=300)
    # the schedule starts once every host is up (Ray starts their processes slowly on a busy machine)
    t0 = time.time() + 3 + ranks / 500
    freeze_at = t0 + duration_s * freeze_frac
    cpu0, cpu_t0 = cpu_of(pids), time.time()
    done = [h.run.remote({"t0": t0, "freeze_at": freeze_at}) for h in hosts]
    log(f"{ranks} ranks ({sim}{', aggregated' if aggregate else ''}{', relayed' if relay else ''}) on {len(nodes)} nodes; rank {frozen} freezes {freeze_at - t0:.1f}s after the first step")

    sample = sorted({per[i % len(per)][j] for i in range(len(per)) for j in (0, len(per[i]) // 2, len(per[i]) - 1)
                     if per[i]})[:32]
    probe = LagProbe(root, run_id, sample)
    probe.start()
    dog = Watchdog.from_config(hang)
    ages: list[float] = []  # in the monitor, by its clock at the snapshot
    ages_dog: list[float] = []  # once the snapshot is back in this process (what the watchdog judges by)
    snap = lambda self: (time.time(), self.snapshot())  # noqa: E731
    tick = min(TelemetryConfig().progress_every_s, 2.0)  # the controller's tick
    named_s, report, false_stalls = None, None, []
    deadline = freeze_at + hang.timeout_s + 30
    while time.time() < deadline:
        time.sleep(tick)
        try:
            progress = ray.get(metrics.poll.remote(), timeout=5)["progress"]
        except ray.exceptions.GetTimeoutError:
            progress = {}
        try:
            at, beats = ray.get(monitor.__ray_call__.remote(snap), timeout=5)
        except ray.exceptions.GetTimeoutError:
            log("health monitor snapshot timed out")
            continue
        now = time.time()
        if verbose:
            log(f"t={now - t0:.0f}s slots {ray.get(coordinator.stats.remote(), timeout=30)}")
        if now >= t0:
            live = [b["time"] for r, b in beats.items() if not (r == frozen and at >= freeze_at)]
            ages += [at - t for t in live]
            ages_dog += [now - t for t in live]
        report = dog.check(beats, median_step_s=progress.get("median_step_time_s"), world=ranks,
                           nodes=[node_of[r] for r in range(ranks)])
        if report is None:
            continue
        culprit = report["culprits"][0] if report["culprits"] else None
        store.add_event(run_id, kind="stall", severity="error", message=report["message"], step=report["step"],
                        rank=culprit, data={k: report[k] for k in ("verdict", "culprits", "culprit_nodes")})
        if now >= freeze_at and culprit == frozen:
            named_s = time.time() - freeze_at
            break
        false_stalls.append({"at_s": round(now - t0, 1), "culprits": report["culprits"][:5],
                             "verdict": report["verdict"]})
        dog.reset()
        if len(false_stalls) > 3:
            break
    log(f"stall named after {named_s}s" if named_s is not None else f"stall not named; false: {false_stalls}")
    cpu1, cpu_t1 = cpu_of(pids), time.time()
    for h in hosts:
        h.stop.remote()
    results = ray.get(done, timeout=600)
    probe.done.set()
    probe.join(timeout=30)
    stats = ray.get(coordinator.stats.remote())
    monitor_calls = ray.get(monitor.__ray_call__.remote(lambda self: dict(getattr(self, "calls", {}))), timeout=60)
    relay_counts = ray.get([r.counts.remote() for r in relays.by_node.values()], timeout=60) if relays else []
    stored = sum(n for key in KEYS for _, _, _, n in store.points.find(run_id, key))
    writes = [w for r in results for w in r["writes"]]
    out = {
        "ranks": ranks, "nodes": len(nodes), "duration_s": duration_s,
        "sim": sim, "aggregate": aggregate, "relay": relay,
        "monitor_calls": monitor_calls,
        "relay_calls": {k: sum(c[k] for c in relay_counts) for k in relay_counts[0] if k != "node"} if relay_counts else None,
        "heartbeat_age_p99_s": p99(ages), "heartbeat_age_max_s": round(max(ages), 3) if ages else None,
        "heartbeat_age_watchdog_p99_s": p99(ages_dog),
        "ingest_lag_p99_s": p99(probe.lags), "ingest_lag_samples": len(probe.lags),
        "points_sent": sum(r["logged"] for r in results), "points_acked": sum(r["acked"] for r in results),
        "points_stored": stored, "points_dropped": sum(r["dropped"] for r in results),
        "unsent": [u for r in results for u in r["unsent"]][:3],
        "slot_grant_p99_s": p99([g for r in results for g in r["grants"]]),
        "slot_writes": len(writes), "write_errors": sum(r["n_write_errors"] for r in results),
        "writes_unfinished": sum(r["stuck"] for r in results), "writes_skipped": sum(r["skipped"] for r in results),
        "write_error_examples": [e for r in results for e in r["write_errors"]][:3],
        "slots_peak": peak_overlap(writes), "slot_cap": min(ck.max_concurrent_writes, ck.per_node_writes * len(set(nodes))),
        "slots_peak_coordinator": stats["peak"],
        "sim_late_p99_s": p99([x for r in results for x in r["late"]]),
        "beats_per_rank_s_after_freeze": min((round(r["beat_rate"], 3) for r in results if r["beat_rate"] is not None),
                                             default=None),
        "send_errors": sum(r.get("send_errors", 0) for r in results),
        "frozen_rank": frozen, "frozen_rank_named_s": None if named_s is None else round(named_s, 2),
        "false_stalls": false_stalls, "hang_timeout_s": hang.timeout_s,
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "cpu_window_s": round(cpu_t1 - cpu_t0, 1),
    }
    for a in [*hosts, *actors.values()]:
        ray.kill(a)
    if relays:
        relays.kill()
    store.close()
    return out


FIGURES = [("heartbeat_age_p99_s", "heartbeat age p99 (s)", 2.0), ("ingest_lag_p99_s", "ingest lag p99 (s)", 5.0),
           ("slot_grant_p99_s", "slot grant p99 (s)", None), ("frozen_rank_named_s", "freeze -> rank named (s)", 50.0),
           ("health_monitor_cpu_s_per_min", "health monitor CPU (s a minute)", None)]


def load_results(results: list[str]) -> dict[str, dict[int, list[dict]]]:
    """LABEL=FILE.json arguments (FILE may be a glob) -> {label: {ranks: [result, ...]}}."""
    import glob

    series: dict[str, dict[int, list[dict]]] = {}
    for arg in results:
        label, _, pattern = arg.rpartition("=")
        paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not paths:
            sys.exit(f"control_plane: --plot: no file matches {pattern!r} (LABEL=FILE.json, a glob allowed)")
        for path in paths:
            load_one(series.setdefault(label or "run", {}), path)
    return series


def load_one(by_ranks: dict[int, list[dict]], path: str) -> None:
    """One saved result (its last line) into {ranks: [result, ...]}."""
    try:
        out = json.loads(Path(path).read_text().strip().splitlines()[-1])
        ranks = int(out["ranks"])
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        sys.exit(f"control_plane: --plot: {path} is not a result of this bench (expected JSON with 'ranks' on "
                 f"its last line): {type(e).__name__}")
    out.setdefault("sim_late_p99_s", out.get("host_late_p99_s"))  # its name in the first round's results
    cpu, window = out.get("cpu_s", {}).get("health_monitor"), out.get("cpu_window_s")
    out["health_monitor_cpu_s_per_min"] = cpu / window * 60 if cpu is not None and window else None
    by_ranks.setdefault(ranks, []).append(out)


def plot(out_png: str, results: list[str]) -> None:
    """Each figure against ranks, one line per label, the median of the runs at each size:
    --plot OUT.png LABEL=FILE.json ..."""
    import statistics

    try:
        import matplotlib
    except ImportError:
        sys.exit("control_plane: --plot needs matplotlib, which is not installed in this environment")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = load_results(results)
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(3.6 * len(FIGURES), 3.6))
    for ax, (key, title, target) in zip(axes, FIGURES, strict=True):
        for label, by_ranks in series.items():
            points = sorted((n, statistics.median(vals)) for n, runs in by_ranks.items()
                            if (vals := [r[key] for r in runs if r.get(key) is not None]))
            line, = ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
            never = [n for n, runs in by_ranks.items() if key == "frozen_rank_named_s" and all(r[key] is None for r in runs)]
            for n in never:  # not named in any run at this size: marked above the target line
                ax.plot([n], [target * 1.3], marker="x", markersize=9, color=line.get_color())
                ax.annotate("never", (n, target * 1.3), textcoords="offset points", xytext=(-30, -3), fontsize=7)
        if target:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        if key not in ("heartbeat_age_p99_s", "frozen_rank_named_s"):  # these span one decade: linear reads better
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ranks")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--nodes", type=int, default=8, help="Ray nodes of a ray.cluster_utils.Cluster (4-8)")
    ap.add_argument("--duration-s", type=float, default=60.0, help="training time before the freeze is due, about")
    ap.add_argument("--ckpt-every", type=int, default=15, help="steps between checkpoints (a step is 1 s)")
    ap.add_argument("--write-s", type=float, default=0.02, help="simulated duration of one shard write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim", choices=["async", "threads"], default="async",
                    help="simulated ranks as asyncio tasks (light) or as the real side threads (2+ threads a rank)")
    ap.add_argument("--aggregate", action="store_true",
                    help="one heartbeat call and one metrics call per node a tick (needs the actors' batch methods)")
    ap.add_argument("--relay", action="store_true",
                    help="the product's per-node relays between the simulated ranks and the run's actors")
    ap.add_argument("--verbose", action="store_true", help="the coordinator's slot counts at every tick, on stderr")
    ap.add_argument("--plot", nargs="+", metavar=("OUT.png", "LABEL=RESULT.json"),
                    help="draw docs/scale_control_plane.png from saved results instead of measuring")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    if args.ranks < 2 or not 1 <= args.nodes <= 16:
        sys.exit(f"control_plane: --ranks must be >= 2 and --nodes 1-16, got {args.ranks} and {args.nodes}")
    if (args.aggregate or args.relay) and args.sim != "async":
        sys.exit("control_plane: --aggregate and --relay work with --sim async only")
    if args.aggregate and args.relay:
        sys.exit("control_plane: --aggregate and --relay are two ways to do the same: give one")

    import logging

    import ray
    from benchlib import git_state, machine
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.ERROR)
        head = ray.get_runtime_context().get_node_id()
        nodes = [head] + sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
        load0 = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="control-plane-") as root:
            out = run(args.ranks, nodes, root=root, duration_s=args.duration_s, ckpt_every=args.ckpt_every,
                      write_s=args.write_s, seed=args.seed, sim=args.sim, aggregate=args.aggregate,
                      relay=args.relay, verbose=args.verbose)
        out["load_before"], out["load_after"] = [round(x, 2) for x in load0], [round(x, 2) for x in os.getloadavg()]
        out["machine"] = machine(**git_state())
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
