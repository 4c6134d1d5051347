"""The control plane at scale: N simulated ranks against the real run actors, on several Ray nodes.

Each simulated rank does what a real rank's side threads do, with the real rank-side classes:
the heartbeat thread (orchestrator/hang/health.py's Heartbeat) every hang.heartbeat_s, the
metric sender (actors/metric_sender.py, its own flusher thread) every telemetry.flush_every_s
with 50 keys logged per step (the built-in loop's train/* and health/compute_s among them, so the
anomaly and straggler detectors do their real work), and at every checkpoint one shard write
through checkpointing/writer.py's FileWriter (jittered start, write slot from the coordinator,
release), the write itself simulated (a sleep of --write-s). The ranks live as threads in one
host actor per Ray node (a few processes for thousands of ranks; the machine has 2 cores).

Against them, the real HealthMonitor, MetricsActor (+ the SQLite tracking store and the anomaly
detector) and CheckpointCoordinator, on the head node as the worker group places them, and the
real watchdog (orchestrator/hang/watchdog.py) run by this process once a controller tick.

At a random moment one rank freezes (as under SIGSTOP: its heartbeats and its training stop);
the other ranks then wait in a collective (their progress stops, their heartbeats go on).

Figures (JSON on the last line):
  heartbeat_age_p99_s  age of each live rank's latest heartbeat, sampled at every watchdog tick
  ingest_lag_p99_s     a point logged (its value is the wall time it was logged) -> readable from
                       the store, for a sample of ranks polled every 0.25 s (so up to 0.25 s high)
  points_sent / points_stored  every point logged vs every point in the store at the end
  slot_grant_p99_s     a write's first slot request -> its grant (the cap makes this grow with N)
  slots_peak / slot_cap  most writes in flight at once (from the writes' own start/end times)
  frozen_rank_named_s  freeze -> the stall event naming that rank (null if it was never named)
  cpu_s                CPU seconds of each actor over the run (psutil, by pid)

  python bench/control_plane.py --ranks 1024 [--nodes 8] [--duration-s 60]

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

KEYS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "health/compute_s",
        "bench/sent_at"] + [f"sys/k{i:02d}" for i in range(43)]  # 50 keys per step


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


class SlowFS:
    """The shard write, simulated: a sleep; each write's start and end are kept (slots in flight)."""

    protocol = "bench"

    def __init__(self, write_s: float):
        self.write_s = write_s
        self.writes: list[tuple[float, float]] = []
        self.sizes: dict[str, int] = {}

    def pipe_file(self, path: str, data: bytes, **kw) -> None:
        t0 = time.time()
        time.sleep(self.write_s)
        self.sizes[path] = len(data)
        self.writes.append((t0, time.time()))

    def invalidate_cache(self, path: str) -> None:
        pass

    def size(self, path: str) -> int:
        return self.sizes[path]


class TimedClient:
    """A rank's coordinator client, timing each write's first slot request to its grant."""

    def __init__(self, client):
        self.client = client
        self.asked: float | None = None
        self.grants: list[float] = []

    def call(self, method: str, *args, **kwargs):
        if method == "acquire" and self.asked is None:
            self.asked = time.time()
        out = self.client.call(method, *args, **kwargs)
        if method == "acquire" and out is not None:
            self.grants.append(time.time() - self.asked)
            self.asked = None
        return out


class CountingMonitor:
    """The health monitor's handle as the heartbeat threads see it, counting the beats they send
    (do the simulated ranks keep their pace on this machine, or is the simulation starved?)."""

    def __init__(self, monitor):
        self.monitor, self.sent = monitor, 0

    @property
    def beat(self):
        self.sent += 1
        return self.monitor.beat

    @property
    def put_dump(self):
        return self.monitor.put_dump


class RankHost:
    """Many simulated ranks in one process: their heartbeat and sender threads are the real ones;
    one thread plays every rank's training loop (a step each step_s, 50 keys logged per step)."""

    def __init__(self, ranks: list[int], node: str, plan: dict, *, monitor, metrics, coordinator):
        from actors.metric_sender import MetricSender
        from checkpointing.client import RayClient
        from checkpointing.config import CheckpointConfig
        from checkpointing.writer import FileWriter
        from orchestrator.hang.health import Health, Heartbeat

        self.ranks, self.node, self.plan = ranks, node, plan
        self.fs = SlowFS(plan["write_s"])
        cfg = CheckpointConfig()
        self.health = {r: Health(r) for r in ranks}
        self.monitor = CountingMonitor(monitor)
        self.beats = {r: Heartbeat(self.monitor, self.health[r], plan["heartbeat_s"]).start() for r in ranks}
        self.senders = {r: MetricSender(metrics, r, flush_every_s=plan["flush_every_s"]) for r in ranks}
        self.clients = {r: TimedClient(RayClient(coordinator)) for r in ranks}
        self.writers = {r: FileWriter(self.fs, self.clients[r], rank=r, node=node, cfg=cfg) for r in ranks}
        self.logged = 0
        self.write_errors: list[str] = []
        self.active: dict[int, threading.Thread] = {}  # each rank's write in progress
        self.skipped = 0
        self.stop_event = threading.Event()

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.stop_event.set()

    def _freeze(self, rank: int) -> None:
        """SIGSTOP, as the monitor and the metrics actor see it: its side threads stop."""
        self.beats[rank]._stop.set()
        sender = self.senders[rank]
        sender._stop.set()
        sender._wake.set()

    def _write(self, rank: int, step: int, threads: list) -> None:
        if self.active.get(rank) is not None and self.active[rank].is_alive():
            self.skipped += 1  # its last checkpoint is still being written: a rank saves one at a time
            return

        def go():
            try:
                self.writers[rank].write(f"ckpt/step{step}/rank{rank}.pt", b"x" * 1024)
            except Exception as e:  # a write that never got a slot: counted, and the bench says so
                self.write_errors.append(f"rank {rank}: {type(e).__name__}: {e}")

        t = self.active[rank] = threading.Thread(target=go, name=f"write-{rank}", daemon=True)
        t.start()
        threads.append(t)

    def run(self) -> dict:
        plan, frozen = self.plan, self.plan["frozen_rank"]
        timer = None
        if frozen in self.health:
            timer = threading.Timer(max(0.0, plan["freeze_at"] - time.time()), self._freeze, (frozen,))
            timer.start()
        writes: list[threading.Thread] = []
        late: list[float] = []  # how far behind its schedule this host's training loop ran
        step = 0
        while not self.stop_event.wait(max(0.0, plan["t0"] + step * plan["step_s"] - time.time())):
            now = time.time()
            if now >= plan["freeze_at"]:
                break
            late.append(now - plan["t0"] - step * plan["step_s"])
            for r in self.ranks:
                h = self.health[r]
                h.step, h.progress, h.phase = step, step + 1, "forward"
                h.coll_entered += 1
                h.coll_completed += 1
                values = {k: 1.0 for k in KEYS}
                values.update({"train/loss": 5.0 / (1 + 0.01 * step), "train/lr": 3e-3, "train/grad_norm": 1.0,
                               "train/tokens_per_s": 1e4, "train/step_time_s": plan["step_s"],
                               "health/compute_s": 0.5 * plan["step_s"] * (1 + 0.01 * random.random()),
                               "bench/sent_at": now})
                self.senders[r].log(values, step=step)
                self.logged += len(values)
            if step and step % plan["ckpt_every"] == 0:
                for r in self.ranks:
                    self._write(r, step, writes)
            step += 1
        for r in self.ranks:  # the others wait in the collective the frozen rank never joins
            h = self.health[r]
            h.phase = "backward"
            h.coll_entered += 1
        beats_at, beats0 = time.time(), self.monitor.sent
        self.stop_event.wait()
        beat_rate = (self.monitor.sent - beats0) / max(1e-9, time.time() - beats_at) / len(self.ranks)
        if timer is not None:
            timer.cancel()
        deadline = time.time() + 120  # one bound for all of them
        for t in writes:
            t.join(timeout=max(0.0, deadline - time.time()))
        stuck = sum(t.is_alive() for t in writes)
        for b in self.beats.values():
            b.stop()
        unsent = []
        for s in self.senders.values():  # delivers what is left (the frozen one: as if sent SIGCONT)
            try:
                s.close()
            except RuntimeError as e:
                unsent.append(str(e))
        return {"logged": self.logged, "late": late, "beat_rate": beat_rate, "acked": sum(s.sent_points for s in self.senders.values()),
                "dropped": sum(s.dropped_points for s in self.senders.values()), "unsent": unsent,
                "grants": [g for c in self.clients.values() for g in c.grants], "writes": self.fs.writes,
                "write_errors": self.write_errors[:5], "n_write_errors": len(self.write_errors), "stuck": stuck,
                "skipped": self.skipped}


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
        write_s: float = 0.02, seed: int = 0, verbose: bool = False) -> dict:
    """One measurement on a connected Ray cluster; `nodes`: the Ray node ids to spread ranks over
    (the run's actors go on the first, as the worker group places them next to the store)."""
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

    if __name__ != "__main__":  # imported (the test): Ray's workers cannot import bench/, so ship the classes
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
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
    t0 = time.time() + 3 + ranks / 100  # every host has started its threads by then
    freeze_at = t0 + duration_s * rng.uniform(0.6, 0.8)
    plan = {"t0": t0, "step_s": step_s, "heartbeat_s": hang.heartbeat_s, "flush_every_s": flush_every_s,
            "ckpt_every": ckpt_every, "write_s": write_s, "freeze_at": freeze_at, "frozen_rank": frozen}
    hosts = [ray.remote(RankHost).options(**on(n, num_cpus=0, max_concurrency=4)).remote(
        rs, n, plan, monitor=monitor, metrics=metrics, coordinator=coordinator) for n, rs in zip(nodes, per, strict=True) if rs]
    pids = {k: [ray.get(a.__ray_call__.remote(lambda self: os.getpid()))] for k, a in actors.items()}
    pids["rank_hosts"] = ray.get([h.pid.remote() for h in hosts], timeout=300)
    cpu0 = cpu_of(pids)
    done = [h.run.remote() for h in hosts]
    log(f"{ranks} ranks on {len(nodes)} nodes; rank {frozen} freezes {freeze_at - t0:.1f}s after the first step")

    sample = sorted({per[i % len(per)][j] for i in range(len(per)) for j in (0, len(per[i]) // 2, len(per[i]) - 1)
                     if per[i]})[:32]
    probe = LagProbe(root, run_id, sample)
    probe.start()
    dog = Watchdog.from_config(hang)
    ages: list[float] = []
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
            beats = ray.get(monitor.snapshot.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:
            log("health monitor snapshot timed out")
            continue
        now = time.time()
        if verbose:
            log(f"t={now - t0:.0f}s slots {ray.get(coordinator.stats.remote(), timeout=30)}")
        if now >= t0:
            ages += [now - b["time"] for r, b in beats.items() if not (r == frozen and now >= freeze_at)]
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
    cpu1 = cpu_of(pids)
    for h in hosts:
        h.stop.remote()
    results = ray.get(done, timeout=600)
    probe.done.set()
    probe.join(timeout=30)
    stats = ray.get(coordinator.stats.remote())
    stored = sum(n for key in KEYS for _, _, _, n in store.points.find(run_id, key))
    writes = [w for r in results for w in r["writes"]]
    out = {
        "ranks": ranks, "nodes": len(nodes), "duration_s": duration_s,
        "heartbeat_age_p99_s": p99(ages), "heartbeat_age_max_s": round(max(ages), 3) if ages else None,
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
        "host_late_p99_s": p99([x for r in results for x in r["late"]]),
        "beats_per_rank_s_after_freeze": round(min(r["beat_rate"] for r in results), 3),
        "frozen_rank": frozen, "frozen_rank_named_s": None if named_s is None else round(named_s, 2),
        "false_stalls": false_stalls, "hang_timeout_s": hang.timeout_s,
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "cpu_window_s": round(time.time() - t0, 1),
    }
    for a in [*hosts, *actors.values()]:
        ray.kill(a)
    store.close()
    return out


FIGURES = [("heartbeat_age_p99_s", "heartbeat age p99 (s)", 2.0), ("ingest_lag_p99_s", "ingest lag p99 (s)", 5.0),
           ("slot_grant_p99_s", "slot grant p99 (s)", None), ("frozen_rank_named_s", "freeze -> rank named (s)", 50.0)]


def plot(out_png: str, results: list[str]) -> None:
    """Each figure against ranks, one line per label, from saved JSON lines: --plot OUT.png LABEL=FILE.json ..."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("control_plane: --plot needs matplotlib, which is not installed in this environment")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for arg in results:
        label, _, path = arg.rpartition("=")
        series.setdefault(label or "run", []).append(json.loads(Path(path).read_text().strip().splitlines()[-1]))
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.5))
    for ax, (key, title, target) in zip(axes, FIGURES, strict=True):
        for label, runs in series.items():
            runs = sorted((r for r in runs if r.get(key) is not None), key=lambda r: r["ranks"])
            ax.plot([r["ranks"] for r in runs], [r[key] for r in runs], marker="o", label=label)
        if target:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_title(title)
    axes[0].legend()
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
    ap.add_argument("--verbose", action="store_true", help="the coordinator's slot counts at every tick, on stderr")
    ap.add_argument("--plot", nargs="+", metavar=("OUT.png", "LABEL=RESULT.json"),
                    help="draw docs/scale_control_plane.png from saved results instead of measuring")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    if args.ranks < 2 or not 1 <= args.nodes <= 16:
        sys.exit(f"control_plane: --ranks must be >= 2 and --nodes 1-16, got {args.ranks} and {args.nodes}")

    import logging

    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import git_state, machine

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
                      write_s=args.write_s, seed=args.seed, verbose=args.verbose)
        out["load_before"], out["load_after"] = [round(x, 2) for x in load0], [round(x, 2) for x in os.getloadavg()]
        out["machine"] = machine(**git_state())
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
