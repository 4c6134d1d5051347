"""Script mode vs torchrun: the same unmodified script (bench/script_body.py), side by side in one run.

- Peer: `python -m torch.distributed.run --standalone --nproc-per-node W --max-restarts 3 script_body.py ARGS`
  ("torchrun"), and the same with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ("torchrun_fresh_store"):
  by default torchrun's restarted workers share the first round's TCPStore, whose keys from the
  previous attempt are still there (torch/distributed/rendezvous.py: "no need to add prefix for
  each attempt"), and on this loaded machine a restart then often fails in init_process_group
  (gloo connects to the dead attempt's address: "Connection refused") or hangs; the opt-out gives
  every round its own store.
- Ours: `orchestrator launch CONFIG` with `entrypoint: {script: script_body.py, args: ARGS}`,
  W workers, fault_tolerance.max_restarts 3 (backoff at its default), an embedded Ray cluster that
  the launch starts itself, as a user's would ("ours"); optionally ("ours_attached") `--address`
  to a Ray cluster that is already up, which leaves Ray's own start-up out; and ("ours_exec") with
  `entrypoint.start: exec`, every script process a fresh `python script_body.py` instead of a fork
  of the warm process that imported torch already (orchestrator/zygote.py), to tell the warm
  start's share of the figures from the restart in place's.
  (`launch --script` with config overrides is not usable yet: see the bench's notes in
  docs/BENCHMARKS.md; the config file holds exactly what --script would set, plus no dashboard.)

The script itself writes the one measurement both share: every rank process appends "exec",
"ready", "start" and "step N T" lines to its own file. From them, per run:
- start to first step: from the launcher command's start until every rank finished its first step;
- per-step time: median over the steady steps of the first attempt (steps --warmup..the kill) of
  the time between consecutive step ends on rank 0 (and the mean, which counts snapshot steps);
- recovery: once rank 0 finished --kill-step, rank --victim-rank's process is SIGKILLed; recovery
  = from the kill until every rank of the new group (new processes) finished a step (the rules of
  bench/recovery.py, whose Killer and analyse this reuses).

Runs alternate (torchrun, ours, ..., then rotated) so machine noise hits all alike; medians are
reported. Progress goes to stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from benchlib import finished_every_step, git_state, machine, medians, paired_ratio, step_times  # noqa: E402
from recovery import OURS_LINES, Killer, analyse, log  # noqa: E402

BODY = BENCH / "script_body.py"
SYSTEMS = ("torchrun", "torchrun_fresh_store", "ours", "ours_attached", "ours_exec")


def read_marks(log_dir: Path) -> dict[int, dict]:
    """pid -> {"rank", "exec", "ready", "start", "steps": [(step, t)], "cpu": {step: CPU s}} from the
    script's step logs."""
    out = {}
    for path in log_dir.glob("rank*-pid*.log"):
        rank, pid = (int(x) for x in path.stem.replace("rank", "").split("-pid"))
        rec: dict = {"rank": rank, "exec": None, "ready": None, "start": None, "steps": [], "cpu": {}}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("exec", "ready", "start"):
                rec[parts[0]] = float(parts[1])
            elif len(parts) == 4 and parts[0] == "step":
                rec["steps"].append((int(parts[1]), float(parts[2])))
                rec["cpu"][int(parts[1])] = float(parts[3])
        out[pid] = rec
    return out


def body_args(args, run_dir: Path, log_dir: Path) -> list[str]:
    return ["--steps", str(args.max_steps), "--snapshot", str(run_dir / "snapshot.pt"), "--save-every",
            str(args.save_every), "--step-log", str(log_dir), "--hidden", str(args.hidden), "--batch", str(args.batch)]


def ours_config(path: Path, args, script_args: list[str], name: str, start: str = "warm") -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "run": {"name": name},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
        "cluster": {"dashboard": False},  # torchrun has none either
        "fault_tolerance": {"max_restarts": 3},
        "entrypoint": {"script": str(BODY), "args": script_args, "start": start},
    }))


def run_cmd(cmd: list[str], env: dict, cwd: Path, killer: Killer, timeout_s: float, recovery_timeout_s: float
            ) -> tuple[float, int | None, list[tuple[float, str]], str]:
    """Start `cmd`, the killer beside it; (start time, exit code or None when it was given up:
    after timeout_s, or recovery_timeout_s after the kill with no step done since, stdout lines
    time-stamped as they arrived, stderr's tail)."""
    lines: list[tuple[float, str]] = []
    with open(cwd / "launcher.stderr", "w+") as err:  # kept with --keep
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                lines.append((time.time(), line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        killer.start()
        code = None
        try:
            while code is None:
                try:
                    code = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    now = time.time()
                    stuck = (killer.kill_time is not None and killer.recovered_at is None
                             and now > killer.kill_time + recovery_timeout_s)
                    if stuck or now > t0 + timeout_s:
                        os.killpg(proc.pid, 9)  # the launcher this bench started, and its children
                        proc.wait()
                        break
        except BaseException:  # interrupted: never leave the launcher behind
            os.killpg(proc.pid, 9)
            proc.wait()
            killer.stop.set()
            raise
        killer.stop.set()
        killer.join(timeout=30)
        reader.join(timeout=5)
        err.seek(0)
        return t0, code, lines, err.read()[-800:]


def kill_leftovers(log_dir: Path) -> None:
    """Rank processes of this run still alive (torchrun puts its workers in their own process
    groups, so a timed-out run can leave a hung attempt behind): SIGKILL them, by pid, after
    checking that the pid still runs this bench's script."""
    for pid in read_marks(log_dir):
        try:
            if str(BODY) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, 9)
        except (OSError, ProcessLookupError):
            pass


def measure(t0: float, log_dir: Path, killer: Killer, args) -> dict:
    """Start, per-step and recovery figures from the step logs (the same rules for every system)."""
    marks = read_marks(log_dir)
    first = [m for pid, m in marks.items() if pid in killer.old_pids] if killer.old_pids else list(marks.values())
    out: dict = {}
    if len({m["rank"] for m in first if m["steps"]}) == args.workers:
        out["start_to_first_step_s"] = max(m["steps"][0][1] for m in first if m["steps"]) - t0
        out["start_to_exec_s"] = min(m["exec"] for m in first if m["exec"]) - t0  # launcher + worker processes
        out["exec_to_ready_s"] = max(m["ready"] for m in first if m["ready"]) - t0 - out["start_to_exec_s"]
    zero = next((m for m in first if m["rank"] == 0), None)
    if zero is not None:
        out.update(step_times(zero["steps"], args.warmup))
        timed = [s for s, _ in zero["steps"] if s >= args.warmup]
        if out.get("steps_timed"):
            # CPU seconds per step of the rank processes themselves, mean over ranks: what the
            # scheduler on a loaded machine does not change much (the launcher's own is not in it)
            lo = timed[0]
            hi = min([timed[-1], *(max(m["cpu"]) for m in first if m["cpu"])])
            cpu = [(m["cpu"][hi] - m["cpu"][lo]) / (hi - lo) for m in first if lo in m["cpu"] and hi in m["cpu"]]
            if len(cpu) == args.workers and hi > lo:
                out["rank_cpu_per_step_s"] = statistics.mean(cpu)
    out.update(analyse(log_dir, killer, args.workers))
    if killer.kill_time is not None:
        new = [m for pid, m in marks.items() if pid not in killer.old_pids]
        for key in ("exec", "ready", "start"):
            ts = [m[key] for m in new if m[key] is not None]
            if len(ts) >= args.workers:
                out[f"kill_to_new_{key}_s"] = max(ts) - killer.kill_time  # every rank got there
        out["completed_all_steps"] = finished_every_step(list(marks.values()), args.workers, args.max_steps)
    return out


def run_one(system: str, i: int, args, tmp: Path, gcs: str | None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{system}{i}-", dir=tmp))
    log_dir = run_dir / "steps"
    log_dir.mkdir()
    script_args = body_args(args, run_dir, log_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if system.startswith("torchrun"):
        if system == "torchrun_fresh_store":
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.workers),
               "--max-restarts", "3", str(BODY), *script_args]
    else:
        cfg = run_dir / "script.yaml"
        ours_config(cfg, args, script_args, name=f"script-bench-{system}-{i}",
                    start="exec" if system == "ours_exec" else "warm")
        env["ORCHESTRATOR_HOME"] = str(run_dir / "home")
        cmd = [sys.executable, "-m", "orchestrator.cli", "launch", str(cfg)]
        if system == "ours_attached":
            cmd += ["--address", gcs]
    killer = Killer(log_dir, kill_step=args.kill_step, victim_rank=args.victim_rank, world=args.workers,
                    deadline=time.time() + args.run_timeout, poll_s=0.02)
    try:
        t0, code, lines, stderr = run_cmd(cmd, env, run_dir, killer, args.run_timeout + 60, args.recovery_timeout)
    finally:
        kill_leftovers(log_dir)
    out = {"system": system, "wall_s": time.time() - t0, "exit_code": code, **measure(t0, log_dir, killer, args)}
    if code != 0:
        out["run_error"] = f"exit {code}: {stderr.strip()}"
    if system.startswith("ours") and killer.kill_time is not None:  # our driver's view of the restart
        for t, line in lines:
            if t >= killer.kill_time and OURS_LINES["restart"].match(line) and "restart_line_s" not in out:
                out["restart_line_s"] = t - killer.kill_time
    return out


def summarise(runs: list[dict]) -> dict:
    errors = [r.get("run_error") or r.get("error") for r in runs if r.get("run_error") or r.get("error")]
    return {"n": len(runs), "errors": errors, **medians(runs, (
        "start_to_first_step_s", "start_to_exec_s", "exec_to_ready_s", "step_s", "step_mean_s", "rank_cpu_per_step_s",
        "recovery_s", "steps_lost", "kill_to_new_exec_s", "kill_to_new_ready_s", "kill_to_new_start_s",
        "restart_line_s", "wall_s"))}


def ratios(results: dict[str, list[dict]], summary: dict, key: str) -> dict:
    """ours*/torchrun* for `key`: of the medians, and the median of each round's pair."""
    out = {}
    for s, runs in results.items():
        for peer_name, peer_runs in results.items():
            if not (s.startswith("ours") and peer_name.startswith("torchrun")):
                continue
            r = paired_ratio(runs, peer_runs, key, summary[s].get(key, {}).get("median"),
                             summary[peer_name].get(key, {}).get("median"))
            if r is not None:
                out[f"{s}/{peer_name}"] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each system (alternating)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=50, help="the script's snapshot interval in steps")
    p.add_argument("--kill-step", type=int, default=160, help="SIGKILL a rank once rank 0 finished this step")
    p.add_argument("--victim-rank", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step time")
    p.add_argument("--hidden", type=int, default=512, help="MLP width (256 -> H -> H -> 10)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds before one run is given up")
    p.add_argument("--recovery-timeout", type=float, default=90,
                   help="give a run up when no step completed this long after the kill")
    p.add_argument("--keep", action="store_true", help="keep the runs' files (step logs, launcher stderr) and print where")
    args = p.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems: unknown {', '.join(bad) or '(empty)'}; expected a subset of {', '.join(SYSTEMS)}")
    if not (args.save_every <= args.kill_step < args.max_steps - 1 and args.warmup + 2 < args.kill_step):
        p.error("need --save-every <= --kill-step < --max-steps - 1 and --warmup + 2 < --kill-step")
    if not 0 <= args.victim_rank < args.workers:
        p.error(f"--victim-rank must be in 0..{args.workers - 1}, got {args.victim_rank}")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: keep the cluster on loopback
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ours sets this itself on a loopback cluster; same for both
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    tmp = Path(tempfile.mkdtemp(prefix="script-bench-"))
    started = time.time()
    facts = machine(git=git_state()["commit"], loadavg_start=os.getloadavg())
    log(f"{facts}")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    try:
        for i in range(args.repeats):
            order = systems[i % len(systems):] + systems[:i % len(systems)]  # rotate: noise hits all alike
            for system in order:
                log(f"repeat {i + 1}/{args.repeats}: {system} ...")
                gcs = None
                if system == "ours_attached":  # a cluster that is up before the launch, only while it runs
                    import logging

                    import ray

                    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
                             log_to_driver=False)
                    gcs = ray.get_runtime_context().gcs_address
                try:
                    r = run_one(system, i, args, tmp, gcs)
                finally:
                    if gcs is not None:
                        ray.shutdown()
                results[system].append(r)
                log(f"  {system}: {({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})}")
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if args.keep:
            log(f"runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {s: summarise(rs) for s, rs in results.items()}
    report = {
        "bench": "script_vs_torchrun",
        "command": "python bench/script_vs_torchrun.py " + " ".join(sys.argv[1:]),
        "setup": {k: getattr(args, k) for k in ("repeats", "workers", "max_steps", "save_every", "kill_step",
                                                  "victim_rank", "warmup", "hidden", "batch")},
        "machine": facts,
        "summary": summary,
        "ratio_start": ratios(results, summary, "start_to_first_step_s"),
        "ratio_step": ratios(results, summary, "step_s"),
        "ratio_step_mean": ratios(results, summary, "step_mean_s"),
        "ratio_rank_cpu_per_step": ratios(results, summary, "rank_cpu_per_step_s"),
        "ratio_recovery": ratios(results, summary, "recovery_s"),
        "target": "per-step ours/torchrun <= 1.03; recovery ours/torchrun <= 0.5",
        "wall_s": round(time.time() - started, 1),
        "runs": results,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
