"""Recovery after a worker SIGKILL: ours vs Ray Train's TorchTrainer, side by side in one run.

Both systems train the same model (orchestrator.gpt.GPT), on the same data (TokenDataset +
GlobalSampler), with the same AdamW, LR schedule and clipping, 2 CPU workers, checkpointing every
--ckpt-every steps, on ONE local Ray cluster this script starts on 127.0.0.1 (the runs take turns).

- Peer: Ray Train v2 `TorchTrainer` with `FailureConfig(max_failures=3)`; its train loop is the
  user code Ray Train needs: it loads `ray.train.get_checkpoint()` on start and every K steps
  saves model + optimizer + step with `ray.train.report(..., checkpoint=Checkpoint.from_directory(..))`.
- Ours: `python -m orchestrator.cli launch CONFIG --address GCS`, with fault_tolerance.backoff_s at
  its default (1 s) and at 0. The model comes through `model.factory` (bench.recovery:timed_gpt),
  which builds the same GPT and installs the step log below; nothing else changes.

One measurement for both: every worker process appends "step N <unix time>" to its own file from a
torch optimizer post-step hook (the moment optimizer.step() returns), plus a "start" line when its
model is built. When rank 0 has finished step --kill-step, we SIGKILL rank --victim-rank's process
(pid from its file). Recovery = time from the kill until every rank of the NEW group (processes
that did not exist before the kill) has finished its first step. Steps lost = last step every old
rank finished before the kill + 1 - the step the new group resumed at. For ours we also read the
store's attempts (recovery_s, steps_lost) and time-stamp the driver's lines (RESTART, rendezvous,
recovered) to split our recovery into phases.

Runs alternate (peer, ours, ours-backoff-0, then rotated) so machine noise hits all alike; medians
are reported. Progress goes to stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run as a script, or imported as bench.NAME by Ray workers (a model factory): benchlib is beside us
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_state, machine, medians  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the step log (runs inside worker processes of both systems) -------------------------------

_hook = None


def install_step_log(log_dir: str, rank: int, model=None) -> None:
    """Append "start T" now and "step N T [B]" after every optimizer.step() of this process to
    LOG_DIR/rank{rank}-pid{pid}.log. N is the 0-based step, read from AdamW's own step count (so
    it is right after a restore too); B, with `model`, is when the step's first forward began, so
    B..T is the step itself and what lies between steps (checkpoint stalls, metrics) is not."""
    global _hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    f = open(Path(log_dir, f"rank{rank}-pid{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115 (process-long)
    f.write(f"start {time.time():.6f}\n")
    began: list[float] = []

    if model is not None:
        def before_forward(module, args) -> None:
            if not began:  # the first micro-batch of the step
                began.append(time.time())

        model.register_forward_pre_hook(before_forward)

    def after_step(optimizer, args, kwargs) -> None:
        state = next(iter(optimizer.state.values()), None)
        step = int(state["step"]) - 1 if state and "step" in state else -1
        begin = f" {began.pop():.6f}" if began else ""
        f.write(f"step {step} {time.time():.6f}{begin}\n")

    if _hook is not None:
        _hook.remove()
    _hook = register_optimizer_step_post_hook(after_step)


def timed_gpt(*, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int,
              step_log_dir: str, dropout: float = 0.0, pause_s: float = 0.0):
    """model.factory for our runs: the built-in GPT, plus the step log. pause_s: each training
    forward first sleeps this long (numerics untouched), so a test's faults land mid-run."""
    from orchestrator.gpt import GPT

    model = GPT(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                dropout=dropout)
    install_step_log(step_log_dir, int(os.environ.get("RANK", "0")), model)
    if pause_s:  # after the step log's hook: the pause is part of the step
        model.register_forward_pre_hook(lambda module, args: time.sleep(pause_s) if module.training else None)
    return model


# --- the peer's train loop (Ray Train worker) ---------------------------------------------------


def lr_at(step: int, lr: float, warmup: int, min_lr_ratio: float, total: int) -> float:
    """Our schedule (orchestrator.gpt_function.lr_at): linear warmup, cosine to lr * min_lr_ratio."""
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn import functional as F

    from dataloading.dataset import TokenDataset
    from dataloading.sampler import GlobalSampler
    from orchestrator.gpt import GPT

    torch.set_num_threads(1)  # as ours (scaling.torch_threads=1)
    torch.use_deterministic_algorithms(True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    data = TokenDataset(config["data_uri"], "train")
    model = GPT(vocab_size=data.index.vocab_size, block_size=data.seq_len - 1, n_layer=config["n_layer"],
                n_head=config["n_head"], d_model=config["d_model"])
    install_step_log(config["step_log_dir"], rank, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config["lr"], betas=(0.9, 0.95),
    )
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    ddp = ray.train.torch.prepare_model(model)  # DDP over gloo, Ray Train's way
    sampler = GlobalSampler(len(data), config["global_batch_size"], config["seed"])
    total, every = config["max_steps"], config["ckpt_every"]
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config["lr"], config["warmup_steps"], 0.1, total)
        batch = data.batch(sampler.local_batch(step, rank, world))
        x, y = batch[:, :-1], batch[:, 1:]
        logits = ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % every == 0 or step + 1 == total:
            metrics = {"step": step + 1, "loss": loss.item()}
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1},
                               Path(d, "state.pt"))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics, checkpoint=None)


# --- reading step logs, killing a worker ---------------------------------------------------------

LOG_NAME = re.compile(r"rank(\d+)-pid(\d+)\.log$")


def read_logs(log_dir: Path) -> list[dict]:
    """One entry per worker process: rank, pid, start time, [(step, end time)] and, beside them,
    each step's begin time (None where the log has none)."""
    procs = []
    for path in log_dir.iterdir():
        m = LOG_NAME.match(path.name)
        if not m:
            continue
        start, steps, begins = None, [], []
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["start"] and len(parts) == 2:
                start = float(parts[1])
            elif parts[:1] == ["step"] and len(parts) in (3, 4):  # 3: no model, no begin
                steps.append((int(parts[1]), float(parts[2])))
                begins.append(float(parts[3]) if len(parts) == 4 else None)
        procs.append({"rank": int(m.group(1)), "pid": int(m.group(2)), "start": start, "steps": steps,
                      "begins": begins})
    return procs


class SideThread(threading.Thread):
    """A benchmark's fault thread: `_run()` in the background until `stop` is set; an exception is
    kept in `error` for the main thread to report, not raised."""

    def __init__(self):
        super().__init__(daemon=True)
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # reported, not raised: the main thread decides
            self.error = f"{type(e).__name__}: {e}"

    def _run(self) -> None:
        raise NotImplementedError


class Killer(SideThread):
    """Waits for rank 0 to finish `kill_step`, SIGKILLs the victim rank's process, then waits for
    the new group's first completed step (or the deadline)."""

    def __init__(self, log_dir: Path, *, kill_step: int, victim_rank: int, world: int, deadline: float,
                 poll_s: float = 0.01):
        super().__init__()
        self.log_dir, self.kill_step, self.victim_rank, self.world = log_dir, kill_step, victim_rank, world
        self.deadline, self.poll_s = deadline, poll_s
        self.kill_time: float | None = None
        self.victim_pid: int | None = None
        self.old_pids: set[int] = set()
        self.recovered_at: float | None = None

    def _run(self) -> None:
        while not self.stop.is_set():
            if time.time() > self.deadline:
                self.error = f"rank 0 never reached step {self.kill_step}"
                return
            procs = read_logs(self.log_dir)
            if any(p["rank"] == 0 and p["steps"] and p["steps"][-1][0] >= self.kill_step for p in procs):
                victims = [p for p in procs if p["rank"] == self.victim_rank]
                if victims:
                    victim = max(victims, key=lambda p: p["start"] or 0)
                    self.old_pids = {p["pid"] for p in procs}
                    self.victim_pid = victim["pid"]
                    self.kill_time = time.time()
                    os.kill(victim["pid"], signal.SIGKILL)  # a worker of the cluster this script started
                    break
            time.sleep(self.poll_s)
        while not self.stop.is_set() and time.time() < self.deadline:
            new = [p for p in read_logs(self.log_dir) if p["pid"] not in self.old_pids and p["steps"]]
            if len({p["rank"] for p in new}) >= self.world:
                self.recovered_at = time.time()
                return
            time.sleep(self.poll_s * 5)
        if self.recovered_at is None and not self.stop.is_set():
            self.error = "no step completed after the kill before the deadline"


def analyse(log_dir: Path, killer: Killer, world: int) -> dict:
    """Recovery seconds and steps lost from the step logs (same rules for both systems)."""
    if killer.kill_time is None:
        return {"error": killer.error or "no kill"}
    t = killer.kill_time
    procs = read_logs(log_dir)
    old = [p for p in procs if p["pid"] in killer.old_pids]
    new = [p for p in procs if p["pid"] not in killer.old_pids]
    last_done = min(max((s for s, ts in p["steps"] if ts < t), default=-1) for p in old)
    firsts = [p["steps"][0] for p in new if p["steps"]]
    if len({p["rank"] for p in new if p["steps"]}) < world:
        return {"error": killer.error or "the new group never completed a step", "kill_after_step": last_done}
    resumed_at = min(s for s, _ in firsts)
    first_done = max(ts for _, ts in firsts)  # every rank of the new group finished its first step
    new_start = min(p["start"] for p in new if p["start"] is not None)
    return {
        "recovery_s": first_done - t,
        "kill_after_step": last_done,
        "resumed_at_step": resumed_at,
        "steps_lost": last_done + 1 - resumed_at,
        "kill_to_new_model_built_s": new_start - t,  # detection + teardown + (backoff) + new workers + rendezvous
        "model_built_to_first_step_s": first_done - new_start,  # checkpoint load + DDP + first step
        "victim_pid": killer.victim_pid,
    }


# --- one run of each system ------------------------------------------------------------------------


def loop_config(args, data_uri: str, log_dir: Path) -> dict:
    """ray_train_loop's config from this bench's model and run arguments."""
    return {"seed": 1, "data_uri": data_uri, "n_layer": args.n_layer, "n_head": args.n_head,
            "d_model": args.d_model, "lr": args.lr, "warmup_steps": 5, "global_batch_size": args.batch,
            "max_steps": args.max_steps, "ckpt_every": args.ckpt_every, "step_log_dir": str(log_dir)}


def fit(trainer) -> tuple[object | None, str | None]:
    """Run trainer.fit(): (its result or None, its error in one line or None)."""
    try:
        result = trainer.fit()
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return result, None if result.error is None else f"{type(result.error).__name__}: {str(result.error)[:300]}"


def make_trainer(loop_cfg: dict, *, name: str, storage: Path, workers: int | tuple[int, int], max_failures: int):
    """The peer: TorchTrainer running ray_train_loop on CPU workers, restarted by FailureConfig.
    `workers` (min, max): Ray Train's elastic group."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.recovery import ray_train_loop as loop  # by reference: workers import it from ROOT

    return TorchTrainer(loop, train_loop_config=loop_cfg, scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                        run_config=RunConfig(name=name, storage_path=str(storage),
                                             failure_config=FailureConfig(max_failures=max_failures)))


def run_ray_train(i: int, args, data_uri: str, tmp: Path) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"raytrain{i}-steps-", dir=tmp))
    storage = Path(tempfile.mkdtemp(prefix=f"raytrain{i}-storage-", dir=tmp))
    trainer = make_trainer(loop_config(args, data_uri, log_dir), name=f"recovery-bench-{i}", storage=storage,
                           workers=args.workers, max_failures=3)
    killer = Killer(log_dir, kill_step=args.kill_step, victim_rank=args.victim_rank, world=args.workers,
                    deadline=time.time() + args.run_timeout)
    killer.start()
    t0 = time.time()
    _, error = fit(trainer)
    killer.stop.set()
    killer.join(timeout=5)
    out = {"system": "ray_train", "wall_s": time.time() - t0, **analyse(log_dir, killer, args.workers)}
    if error:
        out["run_error"] = error
    if killer.kill_time is not None:
        out.update(ray_train_phases(f"recovery-bench-{i}", killer.kill_time))
    return out


RAY_TRAIN_PHASES = {  # Ray Train controller log line -> phase end (seconds after the kill)
    "rt_failure_seen_s": "[FailurePolicy] RETRY",
    "rt_actors_created_s": "worker actors created in",
    "rt_train_context_ready_s": "Train context initialized on workers in",
    "rt_group_started_s": "Worker group startup completed in",
}


def ray_train_phases(run_name: str, kill_time: float) -> dict:
    """Where Ray Train's recovery goes, from its controller's structured log in this cluster's
    session directory (best effort: {} if the log is not where Ray 2.60 writes it)."""
    import ray

    try:
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    except Exception:
        return {}
    out: dict[str, float] = {}
    for path in session.glob("logs/train/ray-train-sys-controller-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("run_name") != run_name or "timestamp_ns" not in rec:
                continue
            t = rec["timestamp_ns"] / 1e9
            if t < kill_time:
                continue
            for key, text in RAY_TRAIN_PHASES.items():
                if key not in out and text in rec.get("message", ""):
                    out[key] = t - kill_time
    return out


OURS_LINES = {
    "restart": re.compile(r"^RESTART \d+/\d+: .* in ([\d.]+)s$"),
    "rendezvous": re.compile(r"^rendezvous done: .*\(([\d.]+)s[:)].*, resuming at step (\d+)"),
    "recovered": re.compile(r"^recovered: step (\d+) done ([\d.]+)s after the failure"),
}


def ours_config(path: Path, args, data_uri: str, log_dir: Path, backoff_s: float | None, name: str) -> None:
    import yaml

    ft = {"max_restarts": 3}
    if backoff_s is not None:
        ft["backoff_s"] = backoff_s
    cfg = {
        "run": {"name": name, "seed": 1},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
        "cluster": {"dashboard": False},
        "data": {"uri": data_uri, "global_batch_size": args.batch},
        "model": {"factory": "bench.recovery:timed_gpt",
                  "kwargs": {"n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model,
                             "step_log_dir": str(log_dir)}},
        "optim": {"lr": args.lr, "warmup_steps": 5},
        "train": {"max_steps": args.max_steps, "eval_every": 0},
        "checkpoint": {"every_steps": args.ckpt_every},
        "fault_tolerance": ft,
    }
    path.write_text(yaml.safe_dump(cfg))


def drive(cfg: Path, home: Path, gcs: str, watcher: threading.Thread, *, timeout_s: float, overrides: list[str] = ()
          ) -> tuple[int, list[tuple[float, str]], str]:
    """`orchestrator launch CFG [OVERRIDES] --address GCS` with its store in HOME, `watcher` (a
    thread with a `stop` event: the fault injector) running beside it. Returns the exit code, the
    driver's stdout lines time-stamped as they arrived, and its stderr."""
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", str(cfg), *overrides, "--address", gcs]
    lines: list[tuple[float, str]] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)

        def read() -> None:
            for line in proc.stdout:
                lines.append((time.time(), line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        watcher.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # the driver this script started
            proc.wait()
        except BaseException:  # interrupted: never leave the driver behind
            proc.kill()
            proc.wait()
            watcher.stop.set()
            raise
        watcher.stop.set()
        watcher.join(timeout=30)
        reader.join(timeout=5)
        err.seek(0)
        return proc.returncode, lines, err.read()


def run_ours(i: int, args, data_uri: str, tmp: Path, gcs: str, backoff_s: float | None) -> dict:
    from orchestrator.store import Store

    label = "ours" if backoff_s is None else f"ours_backoff{backoff_s:g}"
    home = Path(tempfile.mkdtemp(prefix=f"{label}{i}-home-", dir=tmp))
    log_dir = Path(tempfile.mkdtemp(prefix=f"{label}{i}-steps-", dir=tmp))
    cfg = home / "recovery.yaml"
    ours_config(cfg, args, data_uri, log_dir, backoff_s, name=f"recovery-{label}-{i}")
    t0 = time.time()
    killer = Killer(log_dir, kill_step=args.kill_step, victim_rank=args.victim_rank, world=args.workers,
                    deadline=t0 + args.run_timeout)
    returncode, lines, stderr = drive(cfg, home, gcs, killer, timeout_s=args.run_timeout + 30)
    out = {"system": label, "backoff_s": 1.0 if backoff_s is None else backoff_s, "wall_s": time.time() - t0,
           **analyse(log_dir, killer, args.workers)}
    if returncode != 0:
        out["run_error"] = f"exit {returncode}: {stderr.strip()[-500:]}"
    # the driver's own view: its lines, time-stamped as they arrived
    kill = killer.kill_time
    for t, line in lines:
        for key, rx in OURS_LINES.items():
            m = rx.match(line)
            if not m or kill is None or t < kill or f"{key}_line_s" in out:
                continue
            out[f"{key}_line_s"] = t - kill
            if key == "restart":
                out["backoff_chosen_s"] = float(m.group(1))
            elif key == "rendezvous":
                out["rendezvous_reported_s"] = float(m.group(1))
            elif key == "recovered":
                out["driver_says_recovered_s"] = float(m.group(2))
    store = Store(home)
    try:
        runs = store.runs()
        if runs:
            attempts = store.attempts(runs[-1]["id"])
            out["store_attempts"] = [{k: a[k] for k in ("attempt", "status", "cause", "rank", "failed_step",
                                                         "resumed_from_step", "steps_lost", "recovery_s")}
                                     for a in attempts]
            later = [a for a in attempts if a["recovery_s"] is not None]
            failed = [a for a in attempts if a["status"] == "failed"]
            out["store_recovery_s"] = later[0]["recovery_s"] if later else None
            out["store_steps_lost"] = failed[0]["steps_lost"] if failed else None
    finally:
        store.close()
    return out


# --- where our restart goes: the controller's _attempt steps, one at a time ----------------------


def probe_restart(reps: int, workers: int) -> list[dict]:
    """Rebuild a worker group the way orchestrator/worker_group.py does (placement group, one
    TrainWorker actor per rank, node_info, free_port, rendezvous.join), timing each part. The imports that
    join() does (torch, and torch._inductor.config through torch.use_deterministic_algorithms)
    are timed on their own first, in the same processes, so setup_rest_s is what is left:
    set_num_threads, the deterministic flag and init_process_group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.train_worker import TrainWorker
    from orchestrator import cluster, rendezvous
    from orchestrator.config import config_from_dict

    class RestartProbe(TrainWorker):
        def imports(self) -> tuple[float, float]:
            """(import torch + our training module, the import torch.use_deterministic_algorithms
            does in torch 2.13: torch._inductor.config, which pulls in inductor and dynamo)."""
            t = time.perf_counter()
            import torch.distributed  # noqa: F401

            import orchestrator.training  # noqa: F401  (join() imports it too)
            t1 = time.perf_counter()
            import torch._inductor.config  # noqa: F401
            return t1 - t, time.perf_counter() - t1

    cfg = config_from_dict({"data": {"uri": "unused"}})
    rows = []
    for rep in range(reps):
        t0 = time.perf_counter()
        placement = cluster.reserve(run_id=f"recovery-probe-{rep}", num_workers=workers, cpus=1, gpus=0, timeout_s=60)
        t1 = time.perf_counter()
        group = [ray.remote(RestartProbe).options(
            num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(placement.pg, placement_group_bundle_index=b),
        ).remote() for b in range(workers)]
        try:
            infos = ray.get([w.node_info.remote() for w in group])
            t2 = time.perf_counter()
            imports = ray.get([w.imports.remote() for w in group])
            t3 = time.perf_counter()
            port = ray.get(group[0].execute.remote(rendezvous.free_port))
            ray.get([w.execute.remote(rendezvous.join, cfg, rank=r, local_rank=r, world_size=workers,
                                      local_world_size=workers, node_rank=0, master_addr=infos[0]["ip"],
                                      master_port=port) for r, w in enumerate(group)])
            t4 = time.perf_counter()
        finally:
            for w in group:
                ray.kill(w)
            cluster.release(placement)
        rows.append({"reserve_s": t1 - t0, "actors_up_s": t2 - t1, "imports_s": t3 - t2,
                     "import_torch_s": max(a for a, _ in imports), "import_inductor_s": max(b for _, b in imports),
                     "setup_rest_s": t4 - t3, "total_s": t4 - t0})
        log(f"  restart probe {rep + 1}/{reps}: {({k: round(v, 2) for k, v in rows[-1].items()})}")
    return rows


# --- the whole benchmark ---------------------------------------------------------------------------


def machine_facts() -> dict:
    from ray.train.v2._internal.constants import is_v2_enabled

    return machine(ray_train_v2=is_v2_enabled(), git=git_state()["commit"], loadavg_start=os.getloadavg())


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "recovery_s" in r]
    errors = [r.get("run_error") or r.get("error") for r in runs if "recovery_s" not in r or r.get("run_error")]
    return {"n": len(runs), "n_ok": len(ok), "errors": errors, **medians(ok, (
        "recovery_s", "steps_lost", "kill_to_new_model_built_s", "model_built_to_first_step_s", "restart_line_s",
        "backoff_chosen_s", "rendezvous_line_s", "rendezvous_reported_s", "store_recovery_s", "store_steps_lost",
        "recovered_line_s", *RAY_TRAIN_PHASES), digits=3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each system (alternating)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint interval in steps (both systems)")
    p.add_argument("--kill-step", type=int, default=25, help="SIGKILL a worker once rank 0 finished this step")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--victim-rank", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--run-timeout", type=float, default=180, help="seconds before one run is given up")
    p.add_argument("--probe-reps", type=int, default=3,
                   help="after the comparison, time the parts of our group rebuild this many times (0: skip)")
    p.add_argument("--systems", default="ray_train,ours,ours_backoff0",
                   help="comma-separated subset of ray_train, ours (backoff default 1 s), ours_backoff0")
    args = p.parse_args()
    if not (args.ckpt_every <= args.kill_step < args.max_steps - 1):
        p.error("need --ckpt-every <= --kill-step < --max-steps - 1 (a checkpoint before the kill, steps after it)")

    # Before ray is imported: keep the cluster on loopback; workers of both systems import this
    # module (bench.recovery:timed_gpt) and the repo's packages from ROOT.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ours sets this itself on a loopback cluster; same for both
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import logging

    import ray

    from dataloading.prepare import prepare

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    started = time.time()
    try:
        data_uri = str(tmp / "data")
        prepare([str(STDLIB / "json"), str(STDLIB / "email")], data_uri, seq_len=65, val_fraction=0.1,
                include=["*.py"], log=lambda *a: None)
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        gcs = ray.get_runtime_context().gcs_address
        facts = machine_facts()
        log(f"cluster {gcs}; {facts}")

        results: dict[str, list[dict]] = {s: [] for s in systems}
        for i in range(args.repeats):
            order = systems[i % len(systems):] + systems[:i % len(systems)]  # rotate: noise hits all alike
            for system in order:
                log(f"repeat {i + 1}/{args.repeats}: {system} ...")
                if system == "ray_train":
                    r = run_ray_train(i, args, data_uri, tmp)
                elif system == "ours":
                    r = run_ours(i, args, data_uri, tmp, gcs, None)
                elif system == "ours_backoff0":
                    r = run_ours(i, args, data_uri, tmp, gcs, 0.0)
                else:
                    sys.exit(f"bench: unknown system {system!r} (ray_train, ours, ours_backoff0)")
                results[system].append(r)
                brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("store_attempts",)}
                log(f"  {system}: {brief}")
        probe = probe_restart(args.probe_reps, args.workers) if args.probe_reps else []
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {s: summarise(rs) for s, rs in results.items()}
    ratios = {}
    peer = summary.get("ray_train", {}).get("recovery_s", {}).get("median")
    for s in systems:
        mine = summary[s].get("recovery_s", {}).get("median")
        if s != "ray_train" and peer and mine is not None:
            ratios[f"{s}/ray_train"] = round(mine / peer, 3)
    paired = {}  # each repeat's run against the peer's run of the same round (same stretch of machine load)
    for s in systems:
        if s == "ray_train" or "ray_train" not in results:
            continue
        pairs = [a["recovery_s"] / b["recovery_s"] for a, b in zip(results[s], results["ray_train"], strict=False)
                 if "recovery_s" in a and "recovery_s" in b]
        if pairs:
            paired[f"{s}/ray_train"] = {"median": round(statistics.median(pairs), 3), "all": [round(x, 3) for x in pairs]}
    report = {
        "bench": "recovery",
        "command": "python bench/recovery.py " + " ".join(sys.argv[1:]),
        "setup": {k: getattr(args, k) for k in ("repeats", "ckpt_every", "kill_step", "max_steps", "victim_rank",
                                                  "workers", "n_layer", "n_head", "d_model", "batch", "lr")},
        "machine": facts,
        "summary": summary,
        "ratio_recovery_median": ratios,
        "ratio_recovery_paired": paired,
        "our_restart_parts": {k: {"median": round(statistics.median(r[k] for r in probe), 3),
                                  "all": [round(r[k], 3) for r in probe]} for k in (probe[0] if probe else {})},
        "target": "ours <= 0.5x Ray Train recovery; steps lost <= checkpoint interval",
        "wall_s": round(time.time() - started, 1),
        "runs": results,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
