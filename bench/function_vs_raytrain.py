"""Function mode vs Ray Train's TorchTrainer: the same function body, side by side in one run.

bench/function_body.py holds the body once (model, data, training step) with two thin adapters:
`ours(ctx, **kw)` run by `orchestrator launch CONFIG --address GCS` with
`entrypoint.function: bench.function_body:ours`, and `ray_train(config)` run by Ray Train v2's
`TorchTrainer` with `FailureConfig(max_failures=3)`; 2 CPU workers each, on ONE local Ray
cluster this script starts on 127.0.0.1 (the runs take turns). Both checkpoint model + AdamW
state every --ckpt-every steps and log the loss every --log-every steps; what differs is listed
in function_body.py's docstring.

Measured the same way for both, from each worker process's step log (an optimizer post-step hook):
- per-step time: median, over the steady steps of the first attempt (--warmup .. the kill), of
  the time between consecutive step ends on rank 0 (and the mean, which counts checkpoint and
  logging steps);
- recovery: once rank 0 finished --kill-step, rank --victim-rank's process is SIGKILLed; recovery
  = from the kill until every rank of the new group finished a step (bench/recovery.py's rules:
  its Killer and analyse are reused here).
Also start to first step: from the call (trainer.fit() / the launch command) until every rank
finished its first step (both on an already running cluster).

Runs alternate (ray_train, ours, then ours, ray_train, ...); medians are reported. Progress goes
to stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import finished_every_step, git_state, machine, medians, paired_ratio, step_times  # noqa: E402
from recovery import OURS_LINES, Killer, analyse, drive, fit, log, ray_train_phases, read_logs  # noqa: E402

SYSTEMS = ("ray_train", "ours")


def measure(t0: float, log_dir: Path, killer: Killer, args) -> dict:
    """Start, per-step and recovery figures from the step logs (the same rules for both systems)."""
    procs = read_logs(log_dir)
    first = [p for p in procs if p["pid"] in killer.old_pids] if killer.old_pids else procs
    out: dict = {}
    if len({p["rank"] for p in first if p["steps"]}) == args.workers:
        out["start_to_first_step_s"] = max(p["steps"][0][1] for p in first if p["steps"]) - t0
    zero = next((p for p in first if p["rank"] == 0), None)
    if zero is not None:
        out.update(step_times(zero["steps"], args.warmup))
    out.update(analyse(log_dir, killer, args.workers))
    out["completed_all_steps"] = finished_every_step(procs, args.workers, args.max_steps)
    return out


def body_kwargs(args, log_dir: Path) -> dict:
    return {"hidden": args.hidden, "batch": args.batch, "log_every": args.log_every, "step_log_dir": str(log_dir)}


def run_ray_train(i: int, args, tmp: Path) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.function_body import ray_train  # by reference: workers import it from ROOT

    log_dir = Path(tempfile.mkdtemp(prefix=f"raytrain{i}-steps-", dir=tmp))
    storage = Path(tempfile.mkdtemp(prefix=f"raytrain{i}-storage-", dir=tmp))
    name = f"function-bench-{i}"
    config = {**body_kwargs(args, log_dir), "seed": 1, "max_steps": args.max_steps, "ckpt_every": args.ckpt_every}
    trainer = TorchTrainer(ray_train, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                           run_config=RunConfig(name=name, storage_path=str(storage),
                                                failure_config=FailureConfig(max_failures=3)))
    killer = Killer(log_dir, kill_step=args.kill_step, victim_rank=args.victim_rank, world=args.workers,
                    deadline=time.time() + args.run_timeout, poll_s=0.02)
    killer.start()
    t0 = time.time()
    _, error = fit(trainer)
    killer.stop.set()
    killer.join(timeout=5)
    out = {"system": "ray_train", "wall_s": time.time() - t0, **measure(t0, log_dir, killer, args)}
    if error:
        out["run_error"] = error
    if killer.kill_time is not None:
        out.update(ray_train_phases(name, killer.kill_time))
    return out


def run_ours(i: int, args, tmp: Path, gcs: str) -> dict:
    import yaml

    home = Path(tempfile.mkdtemp(prefix=f"ours{i}-home-", dir=tmp))
    log_dir = Path(tempfile.mkdtemp(prefix=f"ours{i}-steps-", dir=tmp))
    cfg = home / "function.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": f"function-bench-{i}", "seed": 1},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
        "cluster": {"dashboard": False},
        "train": {"max_steps": args.max_steps},
        "checkpoint": {"every_steps": args.ckpt_every},
        "fault_tolerance": {"max_restarts": 3},
        "entrypoint": {"function": "bench.function_body:ours", "kwargs": body_kwargs(args, log_dir)},
    }))
    killer = Killer(log_dir, kill_step=args.kill_step, victim_rank=args.victim_rank, world=args.workers,
                    deadline=time.time() + args.run_timeout, poll_s=0.02)
    t0 = time.time()
    returncode, lines, stderr = drive(cfg, home, gcs, killer, timeout_s=args.run_timeout + 30)
    out = {"system": "ours", "wall_s": time.time() - t0, **measure(t0, log_dir, killer, args)}
    if returncode != 0:
        out["run_error"] = f"exit {returncode}: {stderr.strip()[-500:]}"
    if killer.kill_time is not None:  # the driver's view: its lines, time-stamped as they arrived
        for t, line in lines:
            for key, rx in OURS_LINES.items():
                if t >= killer.kill_time and rx.match(line) and f"{key}_line_s" not in out:
                    out[f"{key}_line_s"] = t - killer.kill_time
    return out


def summarise(runs: list[dict]) -> dict:
    errors = [r.get("run_error") or r.get("error") for r in runs if r.get("run_error") or r.get("error")]
    return {"n": len(runs), "errors": errors, **medians(runs, (
        "start_to_first_step_s", "step_s", "step_mean_s", "recovery_s", "steps_lost", "kill_to_new_model_built_s",
        "model_built_to_first_step_s", "restart_line_s", "rendezvous_line_s", "rt_failure_seen_s",
        "rt_actors_created_s", "rt_train_context_ready_s", "rt_group_started_s", "wall_s"))}


def ratio(results: dict[str, list[dict]], summary: dict, key: str) -> dict | None:
    """ours/ray_train for `key`: of the medians, and the median of each round's pair."""
    return paired_ratio(results.get("ours", []), results.get("ray_train", []), key,
                        summary.get("ours", {}).get(key, {}).get("median"),
                        summary.get("ray_train", {}).get(key, {}).get("median"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each system (alternating)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval in steps (both systems)")
    p.add_argument("--log-every", type=int, default=10, help="log the loss every N steps (both systems)")
    p.add_argument("--kill-step", type=int, default=160, help="SIGKILL a worker once rank 0 finished this step")
    p.add_argument("--victim-rank", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step time")
    p.add_argument("--hidden", type=int, default=512, help="MLP width (256 -> H -> H -> 10)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds before one run is given up")
    args = p.parse_args()
    if not (args.ckpt_every <= args.kill_step < args.max_steps - 1 and args.warmup + 2 < args.kill_step):
        p.error("need --ckpt-every <= --kill-step < --max-steps - 1 and --warmup + 2 < --kill-step")
    if not 0 <= args.victim_rank < args.workers:
        p.error(f"--victim-rank must be in 0..{args.workers - 1}, got {args.victim_rank}")
    if args.log_every < 1:
        p.error(f"--log-every must be at least 1, got {args.log_every}")

    # Before ray is imported: workers of both systems import bench.function_body and the repo's
    # packages from ROOT; the cluster stays on loopback.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: keep the cluster on loopback
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ours sets this itself on a loopback cluster; same for both
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import logging

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="function-bench-"))
    started = time.time()
    results: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        gcs = ray.get_runtime_context().gcs_address
        from ray.train.v2._internal.constants import is_v2_enabled

        facts = machine(ray_train_v2=is_v2_enabled(), git=git_state()["commit"], loadavg_start=os.getloadavg())
        log(f"cluster {gcs}; {facts}")
        for i in range(args.repeats):
            for system in (SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]):  # alternate: noise hits both alike
                log(f"repeat {i + 1}/{args.repeats}: {system} ...")
                r = run_ray_train(i, args, tmp) if system == "ray_train" else run_ours(i, args, tmp, gcs)
                results[system].append(r)
                log(f"  {system}: {({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})}")
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {s: summarise(rs) for s, rs in results.items()}
    report = {
        "bench": "function_vs_raytrain",
        "command": "python bench/function_vs_raytrain.py " + " ".join(sys.argv[1:]),
        "setup": {k: getattr(args, k) for k in ("repeats", "workers", "max_steps", "ckpt_every", "log_every",
                                                  "kill_step", "victim_rank", "warmup", "hidden", "batch")},
        "machine": facts,
        "summary": summary,
        "ratio_start": ratio(results, summary, "start_to_first_step_s"),
        "ratio_step": ratio(results, summary, "step_s"),
        "ratio_step_mean": ratio(results, summary, "step_mean_s"),
        "ratio_recovery": ratio(results, summary, "recovery_s"),
        "target": "per-step ours/ray_train <= 1.03 (as for scripts vs torchrun); recovery ours/ray_train <= 0.5",
        "wall_s": round(time.time() - started, 1),
        "runs": results,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
