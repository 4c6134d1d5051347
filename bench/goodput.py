"""Goodput under a fault a minute: ours vs Ray Train's TorchTrainer, side by side in one run.

The demo GPT (configs/demo.yaml's model, batch and optimizer; byte tokens of a few stdlib packages,
129-token sequences; no evals) trains on 2 CPU ranks on a `ray.cluster_utils.Cluster` of one-CPU
worker nodes that this script starts on 127.0.0.1: the ranks' two, a spare (where a restart goes
after a hang, away from the frozen rank's node) and one more per node removal. Every
--fault-every-s of training a fault hits the group that is training: SIGKILL of a rank's process,
once a SIGSTOP of one (a frozen rank: a hang), once the removal of a rank's node. Each system runs
the same steps twice, fault free and under faults, one run after the other:

- ours: `orchestrator launch` with durable, async checkpoints every --ckpt-every steps, and the
  hang watchdog, restart policy and backoff at their defaults (fault_tolerance.max_restarts raised
  to fit the faults). With `checkpoint.memory_every_steps` in the config schema, also
  `ours_memory`: in-memory snapshots every --memory-every steps on top; and `ours_standby`
  (asked for by name): those snapshots plus fault_tolerance.standby_workers (warm spare workers,
  so a restart does not start processes that import torch).
- ray_train: TorchTrainer with FailureConfig(max_failures) on bench/recovery.py's train loop (same
  GPT, sampler, AdamW, LR schedule and clipping), reporting a checkpoint every --ckpt-every steps.
  It has no hang detection short of its 10-minute worker health-check timeout: a frozen rank is
  left frozen for --hang-bound-s, then this script SIGKILLs it (an operator would) and says so.

Measured the same way for both, from a log every worker process writes (bench/recovery.py's step
log: when the model was built, and each optimizer step's first forward and end):

- productive time: the sum of the durations (first forward -> optimizer.step() done, rank 0) of the
  steps that survive into the final model, i.e. each step's last execution; executions that a
  restore redid are lost work, and so is everything between steps (checkpoint stalls, metrics);
- effective training time (ETTR) = productive time / wall time from the first step's forward to
  the last step's end (the one-off start-up before the first step is reported apart);
- per fault: recovery (fault -> every rank of the new group finished its first step), steps lost
  (last step rank 0 of the old group finished + 1 - the step the new group resumed at: what the
  run's total, counted from rank 0's executions, counts), and for ours the
  phases from the driver's lines: detection, diagnosis, teardown, reservation, rendezvous,
  restore, first step;
- bit-exactness: final loss and final weights of the faulted run against the fault-free one.

Progress goes to stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.recovery, by the name the workers import it under
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_state, machine  # noqa: E402

from bench.recovery import OURS_LINES as RECOVERY_LINES  # noqa: E402
from bench.recovery import (  # noqa: E402
    STDLIB,
    SideThread,
    drive,
    fit,
    log,
    make_trainer,
    ray_train_phases,
    read_logs,
)

MODELS = {  # demo: configs/demo.yaml's model, batch and optimizer; tiny: the test suite's (tests/conftest.py)
    "demo": {"n_layer": 4, "n_head": 4, "d_model": 128, "batch": 32, "lr": 0.003, "warmup_steps": 30, "seed": 0},
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 64, "batch": 8, "lr": 0.005, "warmup_steps": 5, "seed": 1},
}
SEQ_LEN = 129  # `orchestrator data prepare`'s default, which `make demo` uses
DATA = ("json", "email", "http", "logging", "unittest")  # stdlib packages: ~2.5 MB of bytes
WORLD = 2
KINDS = ("kill", "stop", "node")
# the checkpointers' own timings (training stalled per save; save -> stored), for docs/SCALE.md's model
CKPT_KEYS = ("ckpt/blocked_s", "ckpt/upload_s", "ckpt/snapshot_blocked_s", "ckpt/snapshot_send_s")


# --- faults --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    kind: str  # kill | stop | node
    rank: int
    pid: int
    at: float  # unix time the fault was injected
    group_pids: list[int]  # the processes of the group it hit
    node: str | None = None  # node removed (kind node)
    old_gone_s: float | None = None  # fault -> the last process of the old group is gone
    bounded: bool = False  # a frozen rank still frozen after --hang-bound-s: this script killed it
    left_frozen: bool = False  # recovered, but the frozen process was still there (then killed)


def plan_kinds(plan: str, n: int) -> list[str]:
    """The kind of each of n faults: the plan, then SIGKILLs."""
    kinds = [k.strip() for k in plan.split(",") if k.strip()]
    return (kinds + ["kill"] * n)[:n]


def current_group(procs: list[dict], since: float) -> dict[int, dict] | None:
    """The newest process of each rank, if every rank has one that started after `since` and has
    finished a step: the group that is training now."""
    group: dict[int, dict] = {}
    for p in procs:
        if p["start"] is None or p["start"] <= since or not p["steps"]:
            continue
        if p["rank"] not in group or p["start"] > group[p["rank"]]["start"]:
            group[p["rank"]] = p
    return group if len(group) == WORLD else None


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def node_of(pid: int, cluster) -> object | None:
    """The cluster node whose raylet is an ancestor of process `pid`."""
    import psutil

    try:
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.Error:
        return None
    for node in cluster.worker_nodes:
        raylets = node.all_processes.get("raylet", [])
        if raylets and raylets[0].process.pid in ancestors:
            return node
    return None


class Injector(SideThread):
    """Every `every_s` of training, one fault into the group that is training (found in the step
    logs), once it has recovered from the previous fault and trained `min_gap_s` since."""

    def __init__(self, log_dir: Path, *, kinds: list[str], every_s: float, max_steps: int, cluster,
                 deadline: float, hang_bound_s: float, min_gap_s: float, poll_s: float = 0.05):
        super().__init__()
        self.log_dir, self.kinds, self.every_s, self.max_steps = log_dir, kinds, every_s, max_steps
        self.cluster, self.deadline, self.hang_bound_s, self.min_gap_s = cluster, deadline, hang_bound_s, min_gap_s
        self.poll_s = poll_s
        self.faults: list[Fault] = []

    def _wait(self, until) -> object | None:
        """Poll `until()` until it returns something, the run ends or the deadline passes."""
        while not self.stop.is_set() and time.time() < self.deadline:
            got = until()
            if got:
                return got
            time.sleep(self.poll_s)
        return None

    def _run(self) -> None:
        group = self._wait(lambda: current_group(read_logs(self.log_dir), 0.0))
        if group is None:
            self.error = "the run never completed a step"
            return
        t0 = min(p["steps"][0][1] for p in group.values())  # the first step: training began
        recovered_at = t0
        for i, kind in enumerate(self.kinds):
            due = max(t0 + (i + 1) * self.every_s, recovered_at + self.min_gap_s)
            if self.stop.wait(max(0.0, due - time.time())) or time.time() > self.deadline:
                return
            since = self.faults[-1].at if self.faults else 0.0
            group = current_group(read_logs(self.log_dir), since)
            if group is None:
                self.error = f"fault {i + 1}: no group training at its time"
                return
            if group[0]["steps"][-1][0] >= self.max_steps - 3:
                return  # the run is ending: a fault now would hit nothing
            fault = self._inject(kind, group[i % WORLD], [p["pid"] for p in group.values()])
            self.faults.append(fault)
            log(f"  fault {i + 1}: {kind} rank {fault.rank} (pid {fault.pid}) at step {group[0]['steps'][-1][0]}")
            self._watch_teardown(fault)
            new = self._wait(lambda f=fault: current_group(read_logs(self.log_dir), f.at))
            if new is None:
                if not self.stop.is_set():
                    self.error = f"fault {i + 1} ({kind}): no recovery before the deadline"
                return
            recovered_at = time.time()
            if kind == "stop" and alive(fault.pid):
                fault.left_frozen = True
                os.kill(fault.pid, signal.SIGKILL)  # a worker of the cluster this script started

    def _inject(self, kind: str, victim: dict, group_pids: list[int]) -> Fault:
        pid = victim["pid"]
        node = node_of(pid, self.cluster) if kind == "node" and self.cluster is not None else None
        if kind == "node" and node is None:
            raise RuntimeError(f"no node of this cluster runs pid {pid}")
        fault = Fault(kind, victim["rank"], pid, time.time(), group_pids, node=node.node_id if node else None)
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)  # workers of the cluster this script started
        elif kind == "stop":
            os.kill(pid, signal.SIGSTOP)
        else:
            self.cluster.remove_node(node, allow_graceful=False)  # a crash: its raylet and workers SIGKILLed
        return fault

    def _watch_teardown(self, fault: Fault) -> None:
        """Until every process of the hit group is gone; a frozen rank still there after
        hang_bound_s is killed here (the peer has no hang detection) and marked `bounded`."""
        def gone() -> bool:
            if fault.kind == "stop" and not fault.bounded and time.time() - fault.at > self.hang_bound_s \
                    and alive(fault.pid):
                fault.bounded = True
                log(f"  frozen rank {fault.rank} still there after {self.hang_bound_s:g}s: SIGKILL")
                os.kill(fault.pid, signal.SIGKILL)
            return not any(alive(p) for p in fault.group_pids)

        if self._wait(gone):
            fault.old_gone_s = time.time() - fault.at


# --- analysis: the same rules for every system --------------------------------------------------


def analyse(log_dir: Path, faults: list[Fault], max_steps: int, intervals: dict[str, int] | None = None) -> dict:
    """Productive time, ETTR, steps lost, the time between steps and per-fault recovery from the
    step logs. `intervals`: {kind: every K steps} of what runs between steps (see between_steps)."""
    procs = read_logs(log_dir)
    runs = [(t, s, b) for p in procs if p["rank"] == 0 for (s, t), b in zip(p["steps"], p["begins"], strict=True)]
    runs.sort()
    last: dict[int, tuple[float, float | None]] = {}
    for t, s, b in runs:
        last[s] = (t, b)  # each step's last execution is the one in the final model
    missing = [s for s in range(max_steps) if s not in last]
    if missing or not runs:
        return {"error": f"steps never completed: {missing[:5]}{'...' if len(missing) > 5 else ''}"}
    if any(b is None for _, b in last.values()):
        return {"error": "a step without its begin time in the step log"}
    productive = sum(t - b for t, b in last.values())
    first_begin = min(b for _, _, b in runs if b is not None)
    window = max(t for t, _, _ in runs) - first_begin
    out = {
        "productive_s": round(productive, 2),
        "train_window_s": round(window, 2),
        "effective_training_time": round(productive / window, 4),
        "faults_per_min": round(len(faults) / (window / 60), 2) if window > 0 else None,
        "step_executions": len(runs),
        "steps_lost": len(runs) - max_steps,
        "step_s_median": round(statistics.median(t - b for t, b in last.values()), 4),
        "first_step_begin": first_begin,
    }
    out["between_steps"] = between_steps(procs, intervals or {})
    out["faults"] = [fault_recovery(procs, f, faults[i + 1].at if i + 1 < len(faults) else math.inf)
                     for i, f in enumerate(faults)]
    return out


def between_steps(procs: list[dict], intervals: dict[str, int]) -> dict:
    """Rank 0's gaps from one step's end to the next step's first forward in the same process (a
    restart's gap is the recovery's, not counted here), summed by what ran in them: the first
    kind of `intervals` whose K divides the steps done (e.g. {"checkpoint": 10, "snapshot": 2}),
    else "plain" (data, metrics)."""
    by_kind: dict[str, list[float]] = {}
    for p in procs:
        if p["rank"] != 0:
            continue
        for (s, end), (s2, _), b2 in zip(p["steps"], p["steps"][1:], p["begins"][1:], strict=False):
            if s2 != s + 1 or b2 is None:
                continue
            kind = next((k for k, every in intervals.items() if every and (s + 1) % every == 0), "plain")
            by_kind.setdefault(kind, []).append(b2 - end)
    return {k: {"n": len(g), "total_s": round(sum(g), 2), "median_ms": round(1e3 * statistics.median(g), 2),
                "max_ms": round(1e3 * max(g), 1)} for k, g in sorted(by_kind.items())}


def fault_recovery(procs: list[dict], f: Fault, next_at: float) -> dict:
    old = [p for p in procs if p["pid"] in f.group_pids]
    done = {p["rank"]: max((s for s, ts in p["steps"] if ts < f.at), default=-1) for p in old}
    last_done = min(done.values()) if len(done) == WORLD else None
    new = [p for p in procs if p["start"] is not None and f.at < p["start"] < next_at and p["steps"]]
    firsts: dict[int, tuple[int, float, float | None]] = {}
    for p in sorted(new, key=lambda p: p["start"]):
        firsts.setdefault(p["rank"], (*p["steps"][0], p["begins"][0]))
    out = {"kind": f.kind, "rank": f.rank, "at": f.at, "old_group_gone_s": f.old_gone_s, "bounded": f.bounded,
           "left_frozen": f.left_frozen, "after_step": last_done}
    if len(firsts) < WORLD:
        return {**out, "recovered": False}
    resumed = min(s for s, _, _ in firsts.values())
    # lost = what rank 0 of the old group finished and the new one redoes: the run's total counts
    # rank 0's executions, and rank 0 may finish a step in flight after the fault hit its peer
    new_start = min(p["start"] for p in new)
    rank0 = [s for p in old if p["rank"] == 0 for s, ts in p["steps"] if ts < new_start]
    out.update({
        "recovered": True,
        "resumed_at_step": resumed,
        "steps_lost": None if last_done is None else max(rank0, default=last_done) + 1 - resumed,
        "recovery_s": max(t for _, t, _ in firsts.values()) - f.at,
        "new_model_built_s": new_start - f.at,
        "first_forward_s": (firsts[0][2] - f.at) if firsts[0][2] is not None else None,
    })
    return out


OURS_LINES = {  # the driver's lines that end a phase of a recovery
    "stall": re.compile(r"^STALL "),
    "flight_recorder": re.compile(r"^\s+flight recorder: "),
    "node_checks_begin": re.compile(r"^checking node "),
    "node_checks_end": re.compile(r"^\s+node checks: "),
    "restart": RECOVERY_LINES["restart"],  # one pattern per driver line, shared with bench/recovery.py
    "rendezvous": RECOVERY_LINES["rendezvous"],
}


DRIVER_KEPT = re.compile(r"^(standby: |rendezvous done: |RESTART |recovered: |STALL)")


def our_phases(lines: list[tuple[float, str]], fault: dict, next_at: float) -> dict:
    """Split one of our recoveries at the driver's lines and the step log (seconds; None where
    not seen). A hang: detection (STALL), flight recorder, teardown, node checks; a dead rank or
    node: detection (the old group is gone: the controller saw the failure and killed the rest),
    teardown. Then for all: backoff and reservation, rendezvous (new actors, imports, process
    group), restore (model built, checkpoint loaded: up to the first forward), first step."""
    if not fault.get("recovered"):
        return {}
    at: dict[str, float] = {}
    match: dict[str, re.Match] = {}
    end = min(next_at, fault["at"] + fault["recovery_s"])  # not a later failure's lines
    for t, line in lines:
        if fault["at"] <= t <= end:
            for key, rx in OURS_LINES.items():
                m = rx.match(line)
                if m and key not in at:
                    at[key], match[key] = t - fault["at"], m
    if "restart" not in at or "rendezvous" not in at:
        return {}
    rendezvous_s = float(match["rendezvous"].group(1))
    backoff_s = float(match["restart"].group(1))
    phases: dict[str, float | None] = {}
    if "stall" in at:
        phases["detection"] = at["stall"]
        fr = at.get("flight_recorder", at["stall"])
        phases["flight_recorder"] = fr - at["stall"]
        # the node checks start once the restarted group recovered (controller _start_checks):
        # a phase of their own only where they ended before the restart (an older build's order)
        begin, end = at.get("node_checks_begin"), at.get("node_checks_end")
        serial = begin is not None and end is not None and end <= at["restart"]
        phases["node_checks"] = end - begin if serial else None
        phases["teardown"] = at["restart"] - fr - (phases["node_checks"] or 0.0)
    else:
        gone = fault["old_group_gone_s"]
        phases["detection"] = min(gone, at["restart"]) if gone is not None else None
        phases["teardown"] = at["restart"] - (phases["detection"] or 0.0)
    # the backoff runs from the failure, so a long teardown or diagnosis uses it up: what is left
    # of it, and reserving the placement group, are one phase (the chosen backoff is beside it)
    phases["backoff_chosen"] = backoff_s
    phases["backoff_and_reservation"] = at["rendezvous"] - rendezvous_s - at["restart"]
    phases["rendezvous"] = rendezvous_s
    first_forward = fault.get("first_forward_s")
    phases["restore"] = first_forward - at["rendezvous"] if first_forward else None
    phases["first_step"] = fault["recovery_s"] - first_forward if first_forward else None
    return {k: (round(v, 3) if v is not None else None) for k, v in phases.items()}


# --- one run of each system --------------------------------------------------------------------


def our_config(path: Path, args, *, data_uri: str, log_dir: Path, ckpt_dir: Path, steps: int, name: str,
               memory: bool, standby: bool = False) -> None:
    import yaml

    m = MODELS[args.model]
    checkpoint = {"uri": str(ckpt_dir), "every_steps": args.ckpt_every}
    if memory:
        checkpoint["memory_every_steps"] = args.memory_every
    cfg = {
        "run": {"name": name, "seed": m["seed"]},
        "scaling": {"num_workers": WORLD, "cpus_per_worker": 1},
        "cluster": {"dashboard": False},
        "data": {"uri": data_uri, "global_batch_size": m["batch"]},
        "model": {"factory": "bench.recovery:timed_gpt",
                  "kwargs": {k: m[k] for k in ("n_layer", "n_head", "d_model")} | {"step_log_dir": str(log_dir),
                                                                                 "pause_s": args.pause_s}},
        "optim": {"lr": m["lr"], "warmup_steps": m["warmup_steps"]},
        "train": {"max_steps": steps, "eval_every": 0},
        "checkpoint": checkpoint,
        "fault_tolerance": {"max_restarts": args.max_restarts, **({"standby_workers": True} if standby else {})},
    }
    path.write_text(yaml.safe_dump(cfg))


def run_ours(label: str, args, *, data_uri: str, tmp: Path, address: str, cluster, steps: int,
             kinds: list[str]) -> dict:
    """One launch of ours (faults `kinds`, none for the reference) on the cluster at `address`
    (`cluster`: the Cluster object node faults need; None without them)."""
    from checkpointing.loader import load_latest
    from orchestrator.store import Store

    home, log_dir, ckpt = (Path(tempfile.mkdtemp(prefix=f"{label}-{what}-", dir=tmp)) for what in ("home", "steps", "ckpt"))
    cfg = home / "goodput.yaml"
    memory = label in ("ours_memory", "ours_standby")
    our_config(cfg, args, data_uri=data_uri, log_dir=log_dir, ckpt_dir=ckpt, steps=steps, name=f"goodput-{label}",
               memory=memory, standby=label == "ours_standby")
    t0 = time.time()
    injector = Injector(log_dir, kinds=kinds, every_s=args.fault_every_s, max_steps=steps, cluster=cluster,
                        deadline=t0 + args.run_timeout, hang_bound_s=args.hang_bound_s, min_gap_s=args.min_gap_s)
    returncode, lines, stderr = drive(cfg, home, address, injector, timeout_s=args.run_timeout, overrides=args.ours_set)
    intervals = {"checkpoint": args.ckpt_every, "snapshot": args.memory_every if memory else 0}
    out = {"system": label, "faulted": bool(kinds), "wall_s": round(time.time() - t0, 2),
           **analyse(log_dir, injector.faults, steps, intervals)}
    if returncode != 0 or injector.error:
        out["run_error"] = f"exit {returncode}: {stderr.strip()[-500:]}" if returncode else injector.error
    if "first_step_begin" in out:
        out["startup_s"] = round(out.pop("first_step_begin") - t0, 2)
        out["ettr_incl_startup"] = round(out["productive_s"] / out["wall_s"], 4)
    for i, f in enumerate(out.get("faults", [])):
        next_at = out["faults"][i + 1]["at"] if i + 1 < len(out["faults"]) else math.inf
        f["phases"] = our_phases(lines, f, next_at)
    # what a recovery found: warm spares or not (kept in the JSON, as the step log does not say it)
    out["driver_lines"] = [[round(t - t0, 2), line] for t, line in lines if DRIVER_KEPT.search(line)]
    store = Store(home)
    try:
        runs = store.runs()
        if runs:
            out["run_id"] = runs[-1]["id"]
            loss = store.series(runs[-1]["id"], "train/loss", rank=0)
            out["losses"] = [p["value"] for p in loss]
            out["attempts"] = [{k: a[k] for k in ("attempt", "status", "cause", "rank", "resumed_from_step",
                                                   "steps_lost", "recovery_s")} for a in store.attempts(runs[-1]["id"])]
            for key in CKPT_KEYS:  # the slowest rank's figure at each checkpoint: what the step waits for
                worst = [p["max"] for p in store.series(runs[-1]["id"], key)]
                if worst:
                    out[f"{key.split('/')[1]}_median"] = round(statistics.median(worst), 4)
    finally:
        store.close()
    loaded = load_latest(str(ckpt))
    out["final"] = None if loaded is None else {"step": loaded.step, "model": loaded.model}
    return out


def run_ray_train(label: str, args, *, data_uri: str, tmp: Path, address: str, cluster, steps: int,
                  kinds: list[str]) -> dict:
    """One TorchTrainer.fit() on the cluster this process is connected to (`address` is its)."""
    import torch

    m = MODELS[args.model]
    log_dir, storage = (Path(tempfile.mkdtemp(prefix=f"{label}-{what}-", dir=tmp)) for what in ("steps", "storage"))
    name = f"goodput-{label}-{int(time.time())}"
    loop_cfg = {"seed": m["seed"], "data_uri": data_uri, **{k: m[k] for k in ("n_layer", "n_head", "d_model")},
                "lr": m["lr"], "warmup_steps": m["warmup_steps"], "global_batch_size": m["batch"],
                "max_steps": steps, "ckpt_every": args.ckpt_every, "step_log_dir": str(log_dir)}
    trainer = make_trainer(loop_cfg, name=name, storage=storage, workers=WORLD, max_failures=args.max_restarts)
    t0 = time.time()
    injector = Injector(log_dir, kinds=kinds, every_s=args.fault_every_s, max_steps=steps, cluster=cluster,
                        deadline=t0 + args.run_timeout, hang_bound_s=args.hang_bound_s, min_gap_s=args.min_gap_s)
    injector.start()
    result, error = fit(trainer)  # bounded: every fault is recovered or killed within hang_bound_s
    injector.stop.set()
    injector.join(timeout=30)
    out = {"system": label, "faulted": bool(kinds), "wall_s": round(time.time() - t0, 2),
           **analyse(log_dir, injector.faults, steps, {"checkpoint": args.ckpt_every})}
    if error or injector.error:
        out["run_error"] = error or injector.error
    if "first_step_begin" in out:
        out["startup_s"] = round(out.pop("first_step_begin") - t0, 2)
        out["ettr_incl_startup"] = round(out["productive_s"] / out["wall_s"], 4)
    for f in out.get("faults", []):
        f["phases"] = ray_train_phases(name, f["at"])
    out["final"] = None
    if result is not None and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d, "state.pt"), weights_only=True)
        out["final"] = {"step": state["step"], "model": state["model"]}
        out["losses"] = [result.metrics.get("loss")] if result.metrics else []
    return out


# --- comparing, summing up -------------------------------------------------------------------------


def bit_exact(faulted: dict, reference: dict) -> dict:
    """Final loss and final weights of a faulted run against its fault-free reference."""
    a, b = faulted.get("losses") or [], reference.get("losses") or []
    fa, fb = faulted.get("final"), reference.get("final")
    out = {"final_loss_equal": bool(a) and bool(b) and a[-1] is not None and a[-1] == b[-1],
           "final_loss": a[-1] if a else None, "reference_final_loss": b[-1] if b else None}
    if len(a) > 1 and len(a) == len(b):
        out["every_step_loss_equal"] = a == b
    if fa and fb and fa["model"] and fb["model"]:
        import torch

        out["final_weights_equal"] = (fa["step"] == fb["step"] and fa["model"].keys() == fb["model"].keys()
                                      and all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"]))
    return out


def recovery_summary(faults: list[dict]) -> dict:
    """Medians of the recoveries, per kind and over all."""
    out = {}
    for kind in (None, *KINDS):
        rs = [f for f in faults if f.get("recovered") and (kind is None or f["kind"] == kind)]
        if not rs:
            continue
        row = {"n": len(rs), "recovery_s_median": round(statistics.median(f["recovery_s"] for f in rs), 2),
               "recovery_s_all": [round(f["recovery_s"], 2) for f in rs],
               "steps_lost_all": [f["steps_lost"] for f in rs]}
        phases = [f["phases"] for f in rs if f.get("phases")]
        if phases:
            row["phases_median_s"] = {k: round(statistics.median(p[k] for p in phases if p.get(k) is not None), 3)
                                      for k in phases[0] if any(p.get(k) is not None for p in phases)}
        out[kind or "all"] = row
    return out


def public(run: dict) -> dict:
    """What goes into the JSON: no weights, no per-step losses."""
    return {k: v for k, v in run.items() if k not in ("final", "losses")}


def calibrate(args, *, data_uri: str, tmp: Path, cluster) -> float:
    """Seconds per step of ours, fault free, from a short run (so --minutes sets the step count)."""
    run = run_ours("calibration", args, data_uri=data_uri, tmp=tmp, address=cluster.address, cluster=cluster,
                   steps=args.calibration_steps, kinds=[])
    if "train_window_s" not in run:
        sys.exit(f"bench: the calibration run failed: {run.get('run_error') or run.get('error')}")
    return run["train_window_s"] / args.calibration_steps


def memory_snapshots_available() -> bool:
    from checkpointing.config import CheckpointConfig

    return "memory_every_steps" in {f.name for f in dataclasses.fields(CheckpointConfig)}


def top_up(cluster, nodes: int) -> None:
    """Back to `nodes` worker nodes after an earlier run's node removals (on the main thread: a
    Ray node sets signal handlers when it starts)."""
    while len(cluster.worker_nodes) < nodes:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()


def start_cluster(nodes: int):
    """A head with no CPUs (drivers and run actors only) and `nodes` one-CPU worker nodes."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    top_up(cluster, nodes)
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    return cluster


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10, help="fault-free length of each run (sets the step count)")
    p.add_argument("--steps", type=int, default=None, help="steps per run instead of --minutes (no calibration)")
    p.add_argument("--fault-every-s", type=float, default=60, help="seconds of training between faults")
    p.add_argument("--plan", default="kill,stop,kill,node",
                   help="kinds of the first faults (kill, stop, node); SIGKILLs after them")
    p.add_argument("--max-faults", type=int, default=None,
                   help="at most this many faults per run (default: one every --fault-every-s until the run ends)")
    p.add_argument("--ckpt-every", type=int, default=10, help="durable checkpoint interval in steps (both systems)")
    p.add_argument("--memory-every", type=int, default=2, help="ours_memory: in-memory snapshot interval in steps")
    p.add_argument("--systems", default="ours,ray_train",
                   help="comma-separated: ours, ray_train, ours_memory (added by itself when the config has "
                        "checkpoint.memory_every_steps), ours_standby (snapshots and standby workers)")
    p.add_argument("--peer-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the peer fault free (for its bit-exactness check)")
    p.add_argument("--hang-bound-s", type=float, default=120, help="a frozen rank still frozen this long is killed")
    p.add_argument("--min-gap-s", type=float, default=10, help="at least this much training after a recovery before the next fault")
    p.add_argument("--max-restarts", type=int, default=100, help="fault_tolerance.max_restarts / FailureConfig(max_failures)")
    p.add_argument("--nodes", type=int, default=None,
                   help="one-CPU worker nodes (default: the ranks, a spare, and one more per node removal)")
    p.add_argument("--calibration-steps", type=int, default=40)
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is given up (default: 3x + 5 min)")
    p.add_argument("--model", choices=sorted(MODELS), default="demo", help="demo: configs/demo.yaml's; tiny: the tests'")
    p.add_argument("--pause-s", type=float, default=0.0, help="sleep in each training forward (tests: faults land mid-run)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for our runs (repeatable), e.g. hang.heartbeat_s=2")
    args = p.parse_args(argv)
    bad = [k for k in args.plan.split(",") if k.strip() and k.strip() not in KINDS]
    if bad:
        p.error(f"--plan: unknown fault kind {bad[0]!r} (expected {', '.join(KINDS)})")
    removals = len([k for k in plan_kinds(args.plan, args.max_faults or 10**4) if k == "node"])
    need = WORLD + 1 + removals
    if args.nodes is None:
        args.nodes = need
    elif args.nodes < need:
        p.error(f"--nodes {args.nodes}: need at least {need} (the ranks, a spare, one more per node removal)")
    if args.steps is not None and args.steps < 2 * args.ckpt_every:
        p.error(f"--steps {args.steps}: need at least 2 checkpoint intervals ({2 * args.ckpt_every})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before ray is imported: loopback only; workers of both systems import bench.recovery from ROOT
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    import ray

    from dataloading.prepare import prepare

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ("ours", "ray_train", "ours_memory", "ours_standby")]
    if unknown:
        sys.exit(f"bench: unknown system {unknown[0]!r} (expected ours, ray_train, ours_memory, ours_standby)")
    if memory_snapshots_available() and "ours" in systems and "ours_memory" not in systems:
        systems.append("ours_memory")
    if {"ours_memory", "ours_standby"} & set(systems) and not memory_snapshots_available():
        sys.exit("bench: ours_memory needs checkpoint.memory_every_steps, which this checkout's config does not have")
    tmp = Path(tempfile.mkdtemp(prefix="goodput-bench-"))
    started = time.time()
    cluster = None
    runs: dict[str, dict] = {}
    try:
        data_uri = str(tmp / "data")
        prepare([str(STDLIB / d) for d in DATA], data_uri, seq_len=SEQ_LEN, val_fraction=0.05, include=["*.py"],
                log=lambda *a: None)
        cluster = start_cluster(args.nodes)
        facts = machine(git=git_state()["commit"], loadavg_start=os.getloadavg(), ray_nodes=args.nodes + 1)
        log(f"cluster {cluster.address}; {facts}")
        if args.run_timeout is None:
            args.run_timeout = 3 * args.minutes * 60 + 300 if args.steps is None else 3600
        steps = args.steps
        if steps is None:
            step_s = calibrate(args, data_uri=data_uri, tmp=tmp, cluster=cluster)
            steps = max(2 * args.ckpt_every, int(args.minutes * 60 / step_s))
            log(f"calibration: {step_s:.3f} s/step -> {steps} steps for {args.minutes:g} min")
        # a fault every fault_every_s for as long as the run lasts: a faulted run is slower than its
        # --minutes (restarts, steps redone), and a fixed count would leave its tail fault free
        n = args.max_faults if args.max_faults is not None else max(1, int(3 * args.minutes * 60 / args.fault_every_s))
        kinds = plan_kinds(args.plan, n)
        order = [("ours_reference", "ours", [])] if any(s.startswith("ours") for s in systems) else []
        order += [(s, s, kinds) for s in systems if s.startswith("ours")]
        if "ray_train" in systems:
            order += [("ray_train_reference", "ray_train", [])] if args.peer_reference else []
            order += [("ray_train", "ray_train", kinds)]
        for label, system, plan in order:
            top_up(cluster, args.nodes)
            log(f"{label}: {steps} steps, faults {plan or 'none'} ...")
            run = (run_ray_train if system == "ray_train" else run_ours)(
                label, args, data_uri=data_uri, tmp=tmp, address=cluster.address, cluster=cluster, steps=steps,
                kinds=plan)
            runs[label] = run
            log(f"  {label}: " + json.dumps({k: v for k, v in public(run).items()
                                             if k not in ("faults", "attempts")})[:600])
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()  # only the raylets this script started
        shutil.rmtree(tmp, ignore_errors=True)

    report = summarise(runs, args, steps, kinds, facts, started)
    print(json.dumps(report), flush=True)


def summarise(runs: dict[str, dict], args, steps: int, kinds: list[str], facts: dict, started: float) -> dict:
    systems = {}
    for label, run in runs.items():
        if label.endswith("_reference"):
            continue
        ref = runs.get("ray_train_reference" if label == "ray_train" else "ours_reference")
        row = public(run)
        row["recovery"] = recovery_summary(run.get("faults", []))
        row["faults_injected"] = len(run.get("faults", []))
        row["faults_recovered"] = sum(1 for f in run.get("faults", []) if f.get("recovered"))
        if ref is not None:
            row.update(bit_exact(run, ref))
            if ref.get("train_window_s") and run.get("train_window_s"):
                # what ETTR leaves out: steps slowed by work beside them (a snapshot's encode and send)
                row["wall_vs_fault_free"] = round(run["train_window_s"] / ref["train_window_s"], 4)
        elif run.get("losses"):
            row["final_loss"] = run["losses"][-1]
        systems[label] = row
    references = {label: public(run) for label, run in runs.items() if label.endswith("_reference")}
    ours = systems.get("ours", {})
    peer = systems.get("ray_train", {})
    ratio = {}
    if ours.get("effective_training_time") and peer.get("effective_training_time"):
        ratio["ettr_ours/ray_train"] = round(ours["effective_training_time"] / peer["effective_training_time"], 3)
    return {
        "bench": "goodput",
        "command": "python bench/goodput.py " + " ".join(sys.argv[1:]),
        "setup": {"steps": steps, "fault_plan": kinds, **{k: getattr(args, k) for k in (
            "minutes", "fault_every_s", "ckpt_every", "memory_every", "hang_bound_s", "min_gap_s", "nodes")},
                  "model": MODELS[args.model], "seq_len": SEQ_LEN, "world": WORLD, "ours_set": args.ours_set},
        "machine": facts,
        # the headline: ours with durable checkpoints
        "effective_training_time": ours.get("effective_training_time"),
        "final_loss_equal": ours.get("final_loss_equal"),
        "faults": ours.get("faults_injected"),
        "steps_lost": ours.get("steps_lost"),
        "ratio": ratio,
        "target": "ours: effective_training_time >= 0.95 at one fault a minute; final loss bit for bit",
        "systems": systems,
        "references": references,
        "wall_s": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    main()
