"""Issue 12's three cluster benchmarks, on the namespaced multi-node cluster of tests/netns_cluster.py
(a head on the host, worker nodes each in their own network and mount namespace, 1 CPU each; this
script starts it, with the head's dashboard on so Ray Jobs work, and removes it at the end).

1. node_crash: a 2-rank run, every process of rank 1's node killed at once (NetnsCluster.crash)
   after step --kill-step; recovery = kill -> every rank of the new group finished its first step,
   read from the same per-process step log as bench/recovery.py (its `install_step_log` runs in
   both systems' workers). Ours: `orchestrator launch` with scaling.min_workers=1 (elastic);
   peer: Ray Train v2 TorchTrainer, elastic too (ScalingConfig(num_workers=(1, 2))) with
   FailureConfig(max_failures=3), running bench/recovery.py's train loop. A spare node is free,
   so both can restart at full size; the new group's size is reported.
2. detach_first_step: `orchestrator launch CONFIG --address ADDR --detach` -> the run's first step,
   as read from the store (and, for reference, from the step log).
3. driver_kill_resume: a run with run.resume: auto submitted as a Ray Job; its driver (pid from the store) is
   SIGKILLed, and the same config is submitted again at once (what a KubeRay RayJob's retry does;
   KubeRay's own delay before it resubmits is not in the figure) -> the first step of a process
   started after the kill. Two ways: driver_kill_job submits a Ray Job whose entrypoint is the
   plain `launch` (deploy/kuberay/rayjob.yaml); driver_kill uses `launch --detach` both times.

Checkpoints, data and step logs are under /tmp, which every node sees (only the nodes' local disk
is private): a shared mount. Progress goes to stderr; one JSON object is the last stdout line.

    .venv/bin/python bench/cluster_recovery.py [--repeats 3] [--only node_crash,detach,driver_kill,driver_kill_job]   (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from benchlib import git_state, machine  # noqa: E402
from recovery import (  # noqa: E402
    STDLIB,
    SideThread,
    drive,
    fit,
    log,
    loop_config,
    make_trainer,
    ours_config,
    ray_train_phases,
    read_logs,
)

from tests.netns_cluster import NetnsCluster, _free_port, unavailable_reason  # noqa: E402

CLI = [sys.executable, "-m", "orchestrator.cli"]


class JobsCluster(NetnsCluster):
    """The harness's cluster, with the head's dashboard on (the Ray Jobs API goes through it),
    listening on the head's bridge address."""

    dashboard_port: int = 0

    def _ray_start_args(self, node):
        args = super()._ray_start_args(node)
        if node.index != 0:
            return args
        self.dashboard_port = _free_port(node.ip)
        # click keeps the last value of a repeated option: this overrides the harness's "false"
        return ["--include-dashboard", "true", "--dashboard-host", node.ip, "--dashboard-port",
                str(self.dashboard_port), *args]


# --- helpers ----------------------------------------------------------------------------------------


def node_of_pid(cluster: NetnsCluster, pid: int) -> int:
    """The worker node index whose network namespace holds `pid` (`ip netns identify`)."""
    ns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30).stdout.strip()
    for node in cluster.worker_nodes:
        if node.netns == ns:
            return node.index
    raise RuntimeError(f"pid {pid} is in no worker node's namespace (got {ns!r})")


def med(vals: list[float]) -> dict:
    vals = [v for v in vals if v is not None]
    return {"median": round(statistics.median(vals), 3), "all": [round(v, 3) for v in vals]} if vals else {}


class NodeCrasher(SideThread):
    """Waits for rank 0 to finish `kill_step`, crashes the node holding rank `victim_rank`'s
    process, then waits until the new group (processes started after the crash) has finished a
    step on every rank it has: `world` ranks, or fewer once `grace_s` passed with only those."""

    def __init__(self, cluster, log_dir: Path, *, kill_step: int, victim_rank: int, world: int, deadline: float,
                 grace_s: float = 30.0):
        super().__init__()
        self.cluster, self.log_dir, self.kill_step, self.victim_rank = cluster, log_dir, kill_step, victim_rank
        self.world, self.deadline, self.grace_s = world, deadline, grace_s
        self.kill_time = self.recovered_at = None
        self.victim_node = None
        self.old_pids: set[int] = set()
        self.killed: list[int] = []

    def _run(self) -> None:
        while not self.stop.is_set():
            if time.time() > self.deadline:
                self.error = f"rank 0 never reached step {self.kill_step}"
                return
            procs = read_logs(self.log_dir)
            if any(p["rank"] == 0 and p["steps"] and p["steps"][-1][0] >= self.kill_step for p in procs):
                victim = max((p for p in procs if p["rank"] == self.victim_rank), key=lambda p: p["start"] or 0)
                self.old_pids = {p["pid"] for p in procs}
                self.victim_node = node_of_pid(self.cluster, victim["pid"])
                self.kill_time = time.time()
                self.killed = self.cluster.crash(self.victim_node)
                break
            time.sleep(0.02)
        first_seen = None
        while not self.stop.is_set() and time.time() < self.deadline:
            new = [p for p in read_logs(self.log_dir) if p["pid"] not in self.old_pids and p["steps"]]
            ranks = {p["rank"] for p in new}
            if ranks and first_seen is None:
                first_seen = time.time()
            if len(ranks) >= self.world or (first_seen and time.time() - first_seen > self.grace_s):
                self.recovered_at = time.time()
                return
            time.sleep(0.1)


def analyse(log_dir: Path, crasher: NodeCrasher) -> dict:
    if crasher.kill_time is None:
        return {"error": crasher.error or "no kill"}
    t = crasher.kill_time
    procs = read_logs(log_dir)
    old = [p for p in procs if p["pid"] in crasher.old_pids]
    new = [p for p in procs if p["pid"] not in crasher.old_pids and p["steps"]]
    if not new:
        return {"error": crasher.error or "the new group never completed a step"}
    ranks = sorted({p["rank"] for p in new})
    last_done = min(max((s for s, ts in p["steps"] if ts < t), default=-1) for p in old)
    firsts = {}
    for p in new:  # a rank's first step in the new group (its earliest process after the kill)
        s, ts = p["steps"][0]
        if p["rank"] not in firsts or ts < firsts[p["rank"]][1]:
            firsts[p["rank"]] = (s, ts)
    return {"recovery_s": max(ts for _, ts in firsts.values()) - t, "new_world": len(ranks),
            "kill_after_step": last_done, "resumed_at_step": min(s for s, _ in firsts.values()),
            "steps_lost": last_done + 1 - min(s for s, _ in firsts.values()),
            "kill_to_new_model_built_s": min(p["start"] for p in new if p["start"]) - t,
            "victim_node": crasher.victim_node, "processes_killed": len(crasher.killed)}


# --- 1. node crash: ours vs Ray Train ------------------------------------------------------------------


def crash_ours(i: int, args, cluster, data_uri: str, tmp: Path) -> dict:
    import yaml

    from orchestrator.store import Store

    home = Path(tempfile.mkdtemp(prefix=f"ours{i}-home-", dir=tmp))
    log_dir = Path(tempfile.mkdtemp(prefix=f"ours{i}-steps-", dir=tmp))
    cfg_path = home / "crash.yaml"
    ours_config(cfg_path, args, data_uri, log_dir, args.backoff_s, name=f"crash-ours-{i}")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["scaling"].update(min_workers=1, start_timeout_s=120)
    cfg["checkpoint"]["uri"] = str(tmp / f"ours{i}-ckpt")
    cfg_path.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    crasher = NodeCrasher(cluster, log_dir, kill_step=args.kill_step, victim_rank=1, world=args.workers,
                          deadline=t0 + args.run_timeout)
    code, lines, stderr = drive(cfg_path, home, cluster.address, crasher, timeout_s=args.run_timeout + 60)
    out = {"system": "ours", "wall_s": time.time() - t0, **analyse(log_dir, crasher)}
    if code != 0:
        out["run_error"] = f"exit {code}: {stderr.strip()[-400:]}"
    out["driver_lines"] = [line for _, line in lines if line.startswith(("RESTART", "elastic", "rendezvous", "recovered"))][:6]
    store = Store(home)
    try:
        runs = store.runs()
        if runs:
            out["store_attempts"] = [{k: a.get(k) for k in ("attempt", "status", "cause", "rank", "steps_lost",
                                                             "recovery_s")} for a in store.attempts(runs[-1]["id"])]
    finally:
        store.close()
    return out


def crash_ray_train(i: int, args, cluster, data_uri: str, tmp: Path) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"rt{i}-steps-", dir=tmp))
    storage = Path(tempfile.mkdtemp(prefix=f"rt{i}-storage-", dir=tmp))
    name = f"crash-rt-{i}"
    trainer = make_trainer(loop_config(args, data_uri, log_dir), name=name, storage=storage,
                           workers=(1, args.workers), max_failures=3)  # elastic, as ours
    crasher = NodeCrasher(cluster, log_dir, kill_step=args.kill_step, victim_rank=1, world=args.workers,
                          deadline=time.time() + args.run_timeout)
    crasher.start()
    t0 = time.time()
    _, error = fit(trainer)
    crasher.join(timeout=60)
    crasher.stop.set()
    out = {"system": "ray_train", "wall_s": time.time() - t0, **analyse(log_dir, crasher)}
    if error:
        out["run_error"] = error
    if crasher.kill_time is not None:
        out.update(ray_train_phases(name, crasher.kill_time))
    return out


# --- 2 and 3: detached runs ------------------------------------------------------------------------------


def detached_config(work: Path, args, data_uri: str, log_dir: Path, name: str, *, max_steps: int, pause_s: float,
                    ckpt_uri: str) -> Path:
    import yaml

    cfg = {
        "run": {"name": name, "seed": 1, "resume": "auto"},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1, "start_timeout_s": 120},
        "cluster": {"dashboard": False},
        "data": {"uri": data_uri, "global_batch_size": args.batch},
        "model": {"factory": "bench.recovery:timed_gpt",
                  "kwargs": {"n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model,
                             "step_log_dir": str(log_dir), "pause_s": pause_s}},
        "optim": {"lr": args.lr, "warmup_steps": 5},
        "train": {"max_steps": max_steps, "eval_every": 0},
        "checkpoint": {"every_steps": args.ckpt_every, "uri": ckpt_uri},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(cluster, work: Path, home: Path) -> tuple[str, float, str]:
    """launch --detach from `work`; (run id, seconds the CLI took, its stdout)."""
    t0 = time.time()
    proc = subprocess.run([*CLI, "launch", "run.yaml", "--address", cluster.address, "--detach"], cwd=work,
                          env=cluster.env(ORCHESTRATOR_HOME=str(home)), capture_output=True, text=True, timeout=180)
    took = time.time() - t0
    if proc.returncode != 0 or "submitted run " not in proc.stdout:
        raise RuntimeError(f"launch --detach exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout.split("submitted run ")[1].split()[0], took, proc.stdout


def store_steps(home: Path, run_id: str | None = None, name: str | None = None) -> tuple[str | None, int]:
    """(run id, its last rank-0 train/loss step in the store; -1 if none)."""
    from orchestrator.store import Store

    if not (home / "store.db").exists():
        return None, -1
    store = Store(home, create=False)
    try:
        if run_id is None:
            run = store.latest_named(name)
            if run is None:
                return None, -1
            run_id = run["id"]
        if not store.has_run(run_id) or "train/loss" not in store.metric_keys(run_id):
            return run_id, -1
        pts = store.series(run_id, "train/loss", rank=0)
        return run_id, pts[-1]["step"] if pts else -1
    finally:
        store.close()


def wait_status(home: Path, run_id: str, want: tuple[str, ...], timeout_s: float) -> str:
    from orchestrator.store import Store

    deadline = time.time() + timeout_s
    status = "?"
    while time.time() < deadline:
        store = Store(home, create=False)
        try:
            status = store.run(run_id)["status"]
        finally:
            store.close()
        if status in want:
            return status
        time.sleep(0.5)
    return status


def detach_first_step(i: int, args, cluster, data_uri: str, tmp: Path) -> dict:
    home, work = tmp / f"detach{i}-home", tmp / f"detach{i}-work"
    log_dir = Path(tempfile.mkdtemp(prefix=f"detach{i}-steps-", dir=tmp))
    detached_config(work, args, data_uri, log_dir, f"detach-{i}", max_steps=10, pause_s=0.0,
                    ckpt_uri=str(tmp / f"detach{i}-ckpt"))
    t0 = time.time()
    run_id, cli_s, _ = submit(cluster, work, home)
    deadline = t0 + args.run_timeout
    store_first = None
    while time.time() < deadline:
        if store_steps(home, run_id)[1] >= 0:
            store_first = time.time() - t0
            break
        time.sleep(0.1)
    logged = [ts for p in read_logs(log_dir) for _, ts in p["steps"][:1]]
    status = wait_status(home, run_id, ("completed", "failed", "stopped"), args.run_timeout)
    out = {"cli_returned_s": cli_s, "first_step_in_store_s": store_first,
           "first_step_done_s": (min(logged) - t0) if logged else None, "final_status": status}
    if store_first is None:
        out["error"] = "no step in the store before the timeout"
    return out


def submit_job(cluster, work: Path, home: Path, n: int) -> tuple[str, float, str]:
    """What a KubeRay RayJob does on each try: a Ray Job (a new submission id each time) whose
    entrypoint is the plain `orchestrator launch CONFIG run.resume=auto` (deploy/kuberay/rayjob.yaml)."""
    from ray.job_submission import JobSubmissionClient

    t0 = time.time()
    client = JobSubmissionClient(f"http://{cluster.head_ip}:{cluster.dashboard_port}")
    sid = client.submit_job(entrypoint="python -m orchestrator.cli launch run.yaml run.resume=auto",
                            submission_id=f"{work.name}-try{n}-{os.getpid()}",
                            runtime_env={"working_dir": str(work), "env_vars": {"ORCHESTRATOR_HOME": str(home)}})
    return sid, time.time() - t0, ""


def named_run(home: Path, name: str) -> dict | None:
    from orchestrator.store import Store

    if not (home / "store.db").exists():
        return None
    store = Store(home, create=False)
    try:
        return store.latest_named(name)
    finally:
        store.close()


def driver_kill_resume(i: int, args, cluster, data_uri: str, tmp: Path, via: str) -> dict:
    """via "job": submitted twice as a KubeRay RayJob would; via "detach": `launch --detach` twice."""
    from orchestrator.store import Store

    home, work = tmp / f"{via}{i}-home", tmp / f"{via}{i}-work"
    log_dir = Path(tempfile.mkdtemp(prefix=f"{via}{i}-steps-", dir=tmp))
    name = f"resume-{via}-{i}"
    detached_config(work, args, data_uri, log_dir, name, max_steps=args.max_steps, pause_s=0.1,
                    ckpt_uri=str(tmp / f"{via}{i}-ckpt"))

    def again(n: int):
        return submit(cluster, work, home) if via == "detach" else submit_job(cluster, work, home, n)

    again(0)
    deadline = time.time() + args.run_timeout
    run = None
    while time.time() < deadline:
        run = named_run(home, name)
        if run and store_steps(home, run["id"])[1] >= args.kill_step:
            break
        time.sleep(0.2)
    run = named_run(home, name)
    pid = run and run.get("driver_pid")
    if not pid or store_steps(home, run["id"])[1] < args.kill_step:
        return {"via": via, "error": f"the run never reached step {args.kill_step} with a driver pid ({run})"}
    run_id = run["id"]
    old_pids = {p["pid"] for p in read_logs(log_dir)}
    step_at_kill = store_steps(home, run_id)[1]
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)  # the run's driver: a process of the head node this script started
    lost_after = None
    while time.time() - t_kill < 30:
        store = Store(home, create=False)
        try:
            if store.run(run_id)["status"] == "lost":
                lost_after = time.time() - t_kill
                break
        finally:
            store.close()
        time.sleep(0.1)
    new_id, cli_s, _ = again(1)  # the same config again (run.resume: auto)
    training_again = store_again = resumed_at = None
    while time.time() < t_kill + args.run_timeout:
        new = [p for p in read_logs(log_dir) if p["pid"] not in old_pids and p["steps"]]
        if new and training_again is None:
            training_again = min(p["steps"][0][1] for p in new) - t_kill
            resumed_at = min(p["steps"][0][0] for p in new)
        if store_again is None:
            store = Store(home, create=False)
            try:
                if len(store.attempts(run_id)) >= 2:  # the resumed attempt, recorded by the new driver
                    store_again = time.time() - t_kill
            finally:
                store.close()
        if training_again is not None and (store_again is not None or via == "detach"):
            break
        time.sleep(0.1)
    final = named_run(home, name)
    status = wait_status(home, final["id"], ("completed", "failed", "stopped"), args.run_timeout) if final else "?"
    store = Store(home, create=False)
    try:
        attempts = [{k: a.get(k) for k in ("attempt", "status", "cause", "resumed_from_step")}
                    for a in store.attempts(final["id"])] if final else []
        n_runs = len(store.runs())
    finally:
        store.close()
    out = {"via": via, "kill_to_training_again_s": training_again, "kill_to_new_attempt_in_store_s": store_again,
           "resubmit_s": cli_s, "judged_lost_after_s": lost_after, "step_in_store_at_kill": step_at_kill,
           "resumed_at_step": resumed_at, "same_run": bool(final) and final["id"] == run_id,
           "resubmitted_as": new_id, "runs_in_store": n_runs, "final_status": status, "attempts": attempts}
    if training_again is None:
        out["error"] = "no step after the kill before the timeout"
    return out


# --- main -------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="node_crash,detach,driver_kill,driver_kill_job",
                   help="node_crash, detach (first step), driver_kill (resubmitted with launch --detach), "
                        "driver_kill_job (resubmitted as a KubeRay RayJob does: a Ray Job running launch)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nodes", type=int, default=3, help="worker nodes (one more than --workers: a spare)")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--kill-step", type=int, default=15)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--backoff-s", type=float, default=None, help="ours: fault_tolerance.backoff_s (default: ours)")
    p.add_argument("--run-timeout", type=float, default=240)
    args = p.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cluster_recovery: the namespaced cluster is unavailable: {reason}")

    os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    os.environ.pop("GLOO_SOCKET_IFNAME", None)  # each node has its own eth0; gloo binds to its hostname's address
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    # a job's entrypoint says `python` for a non-loopback cluster: this venv's, on the head
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    import logging

    from dataloading.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="cluster-recovery-"))
    tmp.chmod(0o755)
    started = time.time()
    cluster = JobsCluster(workers=args.nodes)
    results: dict[str, list[dict]] = {k: [] for k in ("ray_train", "ours", "detach", "driver_kill",
                                                      "driver_kill_job")}
    facts = {}
    try:
        data_uri = str(tmp / "data")
        prepare([str(STDLIB / "json"), str(STDLIB / "email")], data_uri, seq_len=65, val_fraction=0.1,
                include=["*.py"], log=lambda *a: None)
        t = time.time()
        cluster.start()
        log(f"cluster up in {time.time() - t:.1f}s at {cluster.address}, dashboard :{cluster.dashboard_port}")
        os.environ.update(cluster.env())  # before ray is imported: it reads the token settings once
        import ray

        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        facts = machine(git=git_state()["commit"], loadavg_start=os.getloadavg())
        log(f"{facts}")
        for i in range(args.repeats):
            plan = []
            if "node_crash" in only:
                plan += ["ray_train", "ours"] if i % 2 == 0 else ["ours", "ray_train"]
            plan += [x for x in ("detach", "driver_kill", "driver_kill_job") if x in only]
            for what in plan:
                for note in cluster.ensure_healthy():
                    log(f"  {note}")
                log(f"repeat {i + 1}/{args.repeats}: {what} ...")
                fn = {"ray_train": crash_ray_train, "ours": crash_ours, "detach": detach_first_step,
                      "driver_kill": lambda *a: driver_kill_resume(*a, via="detach"),
                      "driver_kill_job": lambda *a: driver_kill_resume(*a, via="job")}[what]
                try:
                    r = fn(i, args, cluster, data_uri, tmp)
                except Exception as e:  # one failed repeat is reported, the others still run
                    r = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                results[what].append(r)
                log(f"  {what}: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}))
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        "node_crash": {s: {"recovery_s": med([r.get("recovery_s") for r in results[s]]),
                           "steps_lost": med([r.get("steps_lost") for r in results[s]]),
                           "new_world": [r.get("new_world") for r in results[s]],
                           "errors": [r.get("run_error") or r.get("error") for r in results[s]
                                      if r.get("run_error") or r.get("error")]} for s in ("ours", "ray_train")},
        "detach_first_step": {k: med([r.get(k) for r in results["detach"]])
                              for k in ("cli_returned_s", "first_step_in_store_s", "first_step_done_s")},
        **{f"driver_kill_resume_{via}": {
            **{k: med([r.get(k) for r in results[key]])
               for k in ("kill_to_training_again_s", "kill_to_new_attempt_in_store_s", "judged_lost_after_s",
                         "resubmit_s")},
            "resumed_at_step": [r.get("resumed_at_step") for r in results[key]],
            "step_in_store_at_kill": [r.get("step_in_store_at_kill") for r in results[key]],
            "same_run": [r.get("same_run") for r in results[key]]}
           for via, key in (("detach", "driver_kill"), ("job", "driver_kill_job")) if results[key]},
    }
    pairs = [a["recovery_s"] / b["recovery_s"] for a, b in zip(results["ours"], results["ray_train"], strict=False)
             if a.get("recovery_s") and b.get("recovery_s")]
    ours_m = summary["node_crash"]["ours"]["recovery_s"].get("median")
    peer_m = summary["node_crash"]["ray_train"]["recovery_s"].get("median")
    report = {
        "bench": "cluster_recovery",
        "command": "python bench/cluster_recovery.py " + " ".join(sys.argv[1:]),
        "setup": {**{k: getattr(args, k) for k in ("repeats", "workers", "nodes", "ckpt_every", "kill_step",
                                                    "max_steps", "n_layer", "n_head", "d_model", "batch", "lr",
                                                    "backoff_s")},
                  "ours": "orchestrator launch, scaling.min_workers=1 (elastic), a spare node",
                  "ray_train": "TorchTrainer, ScalingConfig(num_workers=(1, workers)), FailureConfig(max_failures=3)"},
        "machine": facts,
        "summary": summary,
        "ratio_recovery_median": round(ours_m / peer_m, 3) if ours_m and peer_m else None,
        "ratio_recovery_paired": med(pairs),
        "target": "node crash: ours <= 0.5x Ray Train",
        "wall_s": round(time.time() - started, 1),
        "runs": results,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
