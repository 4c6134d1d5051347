"""Hang detection: time from an injected hang to a report naming the culprit, ours vs torch's own
process-group timeout, and what our heartbeats cost per step, side by side in one run.

The hang, the same on every side: 2 ranks train a small GPT (2 layers, 2 heads, d_model 64, byte
tokens of the stdlib `json` + `email` packages, global batch 8) with DDP over gloo on 127.0.0.1; on
its --hang-call-th training forward, rank 1 writes time.time() to a file and then blocks (a bounded
sleep, as tests/user_models.py hanging_gpt: a data-dependent deadlock, a stuck kernel). Rank 0 goes
on into backward and waits in DDP's gradient all-reduce, which rank 1 never enters. The model comes
from this module's `hanging_gpt` (our side loads it through `model.factory`).

1. Time to a report naming the culprit (hang start -> report):
   - ours: `orchestrator launch` in a subprocess (embedded Ray cluster, ORCHESTRATOR_HOME in a temp
     dir) with the DEFAULT hang settings (hang.timeout_s 45, step_time_factor 10, heartbeat_s 1)
     and fault_tolerance.max_restarts=0. Report = the stall event (`orchestrator diagnose RUN
     --json`, field `time`); we check it names rank 1 (`culprits == [1]`) and its verdict. The
     arrival time of the driver's `STALL` line (printed first; the event is stored after the
     Flight Recorder dumps are collected) is kept too. --repeats runs.
   - peer: the loop a user would write without us: torch.multiprocessing spawn of 2 processes,
     `init_process_group("gloo", init_method="tcp://127.0.0.1:PORT")`, the same model, data,
     sampler and hang. Report = the exception rank 0's training loop gets. Run twice:
     a) torch's default timeout (no `timeout=` argument): `init_process_group` then uses
        `_get_default_timeout(backend)` (torch/distributed/distributed_c10d.py), which for every
        backend but NCCL is `torch.distributed.constants.default_pg_timeout` (= the C++
        `_DEFAULT_PG_TIMEOUT`, 30 minutes; NCCL's is 10 minutes). Waiting 30 minutes is not a
        bench, so it is capped at --peer-cap-s: the result is "no error within the cap".
     b) `timeout=datetime.timedelta(seconds=--peer-timeout-s)` (default: our hang.timeout_s): seconds until
        rank 0 raises, the error's first line, and whether its text names the missing rank.
   Order: ours, peer with our budget, peer default, ours (then more ours for --repeats > 2).

2. Overhead of heartbeats and collective tracking: `orchestrator launch` of the same small config
   (built-in GPT, no hang, defaults otherwise) with hang.enabled=true vs hang.enabled=false, runs
   alternating A B B A A B ..., --overhead-repeats each. Step time as bench/launch_overhead.py takes
   it: `train/step_time_s` (time between consecutive step ends) from `orchestrator metrics --json`,
   first --warmup steps dropped, median per run; ratio = median over runs (on) / (off), plus the
   ratio of each adjacent on/off pair. Step times on a shared 2-core machine move by more than the
   1% target between runs, so CPU figures that other tenants barely move are kept too: each rank's
   process CPU seconds per step (time.process_time, logged by this module's factory every 100
   steps: the built-in GPT, never hanging, the same in both arms), the heartbeat thread's own CPU
   seconds (its per-thread clock), and the launch tree's CPU by process (train workers, the
   HealthMonitor actor, the rest) sampled with psutil as in launch_overhead.

Everything is bounded (per-run timeouts, the peer cap); only processes this script started are
stopped. Progress goes to stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
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
from benchlib import git_state, machine, tree_cpu  # noqa: E402

from orchestrator.config import HangConfig  # noqa: E402

BIN = Path(sys.executable).parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODEL = {"n_layer": 2, "n_head": 2, "d_model": 64}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the injected hang (runs inside the training processes of both sides) ---------------------


def hanging_gpt(*, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int,
                hang_rank: int = 1, hang_call: int = 8, mark_file: str | None = None, hang_max_s: float = 600.0,
                cpu_log_dir: str | None = None, mark_call: int | None = None):
    """model.factory: the built-in GPT whose training forward blocks on `hang_rank` at its
    `hang_call`-th call, after writing time.time() to `mark_file` (the moment the hang begins).
    hang_rank=-1: never hangs. With `mark_call` (and hang_rank -1), rank 1 writes "time pid" to
    `mark_file` at that call and goes on: the bench then freezes that process. With `cpu_log_dir`, every 100th training forward appends
    "calls perf_counter process_time heartbeat_thread_cpu" to cpu_log_dir/rank{R}.log: this
    process's CPU seconds (all threads: training, heartbeat, gloo, metric sender), a figure other
    tenants barely move, and the heartbeat thread's own."""
    from orchestrator.gpt import GPT

    model = GPT(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model)
    rank = int(os.environ.get("RANK", "0"))
    cpu_log = Path(cpu_log_dir, f"rank{rank}.log") if cpu_log_dir else None
    calls, beat_thread = 0, None

    def heartbeat_cpu() -> float:
        """CPU seconds of this process's heartbeat thread (orchestrator/hang/health.py), nan when it has none."""
        nonlocal beat_thread
        if beat_thread is None:
            beat_thread = next((t.ident for t in threading.enumerate() if t.name == "heartbeat"), None)
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(beat_thread)) if beat_thread else float("nan")
        except OSError:
            return float("nan")

    def before_forward(module, args) -> None:
        nonlocal calls
        if not module.training:
            return
        calls += 1
        if cpu_log is not None and calls % 100 == 0:
            with open(cpu_log, "a") as f:
                f.write(f"{calls} {time.perf_counter():.6f} {time.process_time():.6f} {heartbeat_cpu():.6f}\n")
        if mark_call is not None and rank == 1 and calls == mark_call and mark_file:
            Path(f"{mark_file}.tmp").write_text(f"{time.time():.6f} {os.getpid()}\n")
            os.replace(f"{mark_file}.tmp", mark_file)
        if rank == hang_rank and calls == hang_call:
            if mark_file:
                tmp = f"{mark_file}.tmp"
                Path(tmp).write_text(f"{time.time():.6f}\n")
                os.replace(tmp, mark_file)
            deadline = time.monotonic() + hang_max_s
            while time.monotonic() < deadline:  # bounded: whoever started us kills us long before
                time.sleep(0.5)
            raise RuntimeError(f"injected hang of {hang_max_s:.0f}s on rank {rank} ended")

    model.register_forward_pre_hook(before_forward)
    return model


def hang_started(mark_file: Path) -> float | None:
    try:
        return float(mark_file.read_text())
    except (OSError, ValueError):
        return None


# --- peer: a bare torch.distributed DDP loop ---------------------------------------------------


def peer_worker(rank: int, world: int, port: int, timeout_s: float | None, data_uri: str, args: dict,
                out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dataloading.dataset import TokenDataset
    from dataloading.sampler import GlobalSampler

    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)  # as ours (scaling.torch_threads=1)
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}  # None: torch's default
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kw)
    torch.manual_seed(1)
    data = TokenDataset(data_uri, "train")
    model = hanging_gpt(vocab_size=data.index.vocab_size, block_size=data.seq_len - 1, **MODEL,
                        hang_rank=1, hang_call=args["hang_call"], mark_file=str(Path(out_dir, "hang_started")),
                        hang_max_s=args["hang_max_s"])
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.005)
    sampler = GlobalSampler(len(data), args["batch"], 1)
    step = -1
    try:
        for step in range(args["max_steps"]):
            batch = data.batch(sampler.local_batch(step, rank, world))
            x, y = batch[:, :-1], batch[:, 1:]
            logits = ddp(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP's all-reduce: where rank 0 waits for rank 1
            optimizer.step()
    except Exception as e:  # what the user gets from torch
        now = time.time()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"error_time": now, "step": step, "type": f"{type(e).__module__}.{type(e).__qualname__}",
             "text": str(e)}))
        os._exit(1)  # do not wait in destroy_process_group / atexit for a peer that hangs
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"finished": time.time(), "step": step}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peer(label: str, timeout_s: float | None, cap_s: float, data_uri: str, args, tmp: Path) -> dict:
    """Spawn the 2-rank loop; wait until rank 0 reports an error or `cap_s` after the hang began."""
    import torch.multiprocessing as mp

    out_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmp))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # what our workers use on a loopback cluster
    wargs = {"hang_call": args.hang_call, "hang_max_s": cap_s + 120, "batch": 8, "max_steps": args.hang_call + 50}
    t0 = time.time()
    ctx = mp.start_processes(peer_worker, args=(2, free_port(), timeout_s, data_uri, wargs, str(out_dir)), nprocs=2,
                             join=False, start_method="spawn")
    mark, r0 = out_dir / "hang_started", out_dir / "rank0.json"
    result: dict = {"timeout_s": timeout_s, "cap_s": cap_s}
    try:
        start_deadline = time.time() + 300  # spawn + imports + rendezvous + a few steps
        while time.time() < start_deadline and hang_started(mark) is None and not r0.exists():
            if any(p.exitcode not in (None, 0) for p in ctx.processes):
                break
            time.sleep(0.2)
        began = hang_started(mark)
        result["hang_started"] = began
        if began is None:
            result["error"] = "the hang never began (start-up failed or timed out)"
            return result
        log(f"{label}: hang began {began - t0:.1f}s after spawn; waiting up to {cap_s:.0f}s for torch to report")
        while time.time() < began + cap_s and not r0.exists():
            if ctx.processes[0].exitcode is not None:
                break
            time.sleep(0.2)
        if r0.exists():
            rep = json.loads(r0.read_text())
            text = rep.get("text", "")
            result.update(
                raised="error_time" in rep, seconds=rep.get("error_time", rep.get("finished", 0)) - began,
                step=rep["step"], error_type=rep.get("type"),
                error_first_line=text.strip().splitlines()[0] if text.strip() else "",
                names_rank=names_rank(text, 1), error_text=text[:2000],
            )
        else:
            result.update(raised=False, waited_s=round(time.time() - began, 1),
                          rank0_exitcode=ctx.processes[0].exitcode, result=f"no error within the cap of {cap_s:.0f}s")
        return result
    finally:
        for p in ctx.processes:  # only the two processes spawned above
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def names_rank(text: str, rank: int) -> bool:
    """Does an error text point at `rank` (as a rank number)? Torch prefixes its own rank
    ("[Rank 0]") and gloo names peers by address; we look for the missing one by number."""
    own = re.sub(r"\[?\brank\s*0\b\]?", "", text, flags=re.I)
    return bool(re.search(rf"\b(rank|peer|process)\s*[:=#]?\s*{rank}\b", own, flags=re.I))


# --- ours ---------------------------------------------------------------------------------------


def write_config(path: Path, data_uri: str, name: str, *, max_steps: int, model: dict, **sections) -> None:
    import yaml

    cfg = {
        "run": {"name": name, "seed": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "cluster": {"dashboard": False},
        "data": {"uri": data_uri, "global_batch_size": 8},
        "model": model,
        "optim": {"lr": 0.005, "warmup_steps": 5},
        "train": {"max_steps": max_steps, "eval_every": 0},
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))


def launch_env(home: Path) -> dict:
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home), "PYTHONUNBUFFERED": "1",
           # workers import bench.hang_detection (model.factory) and the repo's packages from ROOT
           "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    env.pop("RAY_ADDRESS", None)  # always the embedded cluster
    return env


def cli_json(args: list[str], env: dict) -> object:
    cmd = [str(BIN / "orchestrator"), *args, "--json"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def launch(config: Path, env: dict, timeout_s: float, cpu: bool = False, during=None) -> dict:
    """Run `orchestrator launch CONFIG` to its end (bounded); its output lines time-stamped.
    `during(proc, lines)`, if given, runs while it does (what it returns is kept as "during")."""
    cmd = [str(BIN / "orchestrator"), "launch", str(config)]
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    # its own session: if it must be killed, the Ray daemons it started go with it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    usage, acted = {}, None
    try:
        if during is not None:
            acted = during(proc, lines)
        if cpu:
            usage = tree_cpu(proc, {"TrainWorker": "train_workers", "HealthMonitor": "health_monitor"}, t0 + timeout_s)
        proc.wait(timeout=max(1.0, t0 + timeout_s - time.time()))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    except BaseException:  # the hook failed, or Ctrl-C: never leave a launch behind
        stop(proc)
        raise
    reader.join(10)
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": time.time() - t0, "lines": lines,
            "cpu_s": usage, "during": acted}


def stop(proc: subprocess.Popen) -> None:
    """Stop a launch this script started: Ctrl-C first (it tears its cluster down), then harder."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10)):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session created for it above (launch + its Ray daemons)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def run_ours_hang(i: int, data_uri: str, args, tmp: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"ours{i}-", dir=tmp))
    mark = home / "hang_started"
    name = f"hang-{i}"
    cfg = home / "hang.yaml"
    write_config(cfg, data_uri, name, max_steps=args.hang_call + 200,
                 model={"factory": "bench.hang_detection:hanging_gpt",
                        "kwargs": {**MODEL, "hang_rank": 1, "hang_call": args.hang_call, "mark_file": str(mark),
                                   "hang_max_s": args.run_timeout + 60}},
                 fault_tolerance={"max_restarts": 0})  # hang.*: the defaults
    env = launch_env(home)
    r = launch(cfg, env, args.run_timeout)
    out: dict = {"returncode": r["returncode"], "timed_out": r["timed_out"], "wall_s": round(r["wall_s"], 1)}
    began = hang_started(mark)
    out["hang_started"] = began
    stall = next(((t, s) for t, s in r["lines"] if s.startswith("STALL")), None)
    if stall:
        out["stall_line"] = stall[1]
        out["stall_line_s"] = stall[0] - began if began else None
        after = [s for t, s in r["lines"] if t >= stall[0] and s != stall[1]]
        out["after_stall_lines"] = after[:8]  # flight recorder summary, node checks, the final error
    exited = r["lines"][-1][0] if r["lines"] else None
    out["last_line"] = r["lines"][-1][1] if r["lines"] else ""
    try:
        run_id = next(x["id"] for x in cli_json(["runs"], env) if x["name"] == name)
        events = [e for e in cli_json(["diagnose", run_id], env)["events"] if e["kind"] == "stall"]
    except (RuntimeError, StopIteration) as e:
        out["error"] = f"no run or diagnosis in the store: {e}"
        return out
    out["run_id"] = run_id
    if not events:
        out["error"] = "no stall event recorded"
        out["tail"] = [s for _, s in r["lines"][-15:]]
        return out
    ev = events[0]
    out.update(
        stall_events=len(events), event_time=ev["time"], seconds=ev["time"] - began if began else None,
        culprits=ev["culprits"], culprit_named=ev["culprits"] == [1], verdict=ev["verdict"], phase=ev["phase"],
        nodes=ev["nodes"], step=ev["step"], stalled_s=ev["stalled_s"], action=ev["action"], message=ev["message"],
        exit_s=(exited - began) if (began and exited) else None,
    )
    return out


ARMS = {  # overhead runs: name -> hang.* overrides
    "on": {"enabled": True},
    "off": {"enabled": False},
    "on_no_fr": {"enabled": True, "flight_recorder_entries": 0},  # diagnostic: heartbeats without the recorder
}


def run_ours_steps(i: int, arm: str, data_uri: str, args, tmp: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"overhead{i}-{arm}-", dir=tmp))
    name = f"overhead-{i}-{arm}"
    cfg = home / "steps.yaml"
    cpu_dir = home / "cpu"
    cpu_dir.mkdir()
    # the built-in GPT through this module's factory (never hangs) for the per-step CPU log; same in every arm
    write_config(cfg, data_uri, name, max_steps=args.overhead_steps, hang=ARMS[arm],
                 model={"factory": "bench.hang_detection:hanging_gpt",
                        "kwargs": {**MODEL, "hang_rank": -1, "cpu_log_dir": str(cpu_dir)}})
    env = launch_env(home)
    load = os.getloadavg()[0]
    r = launch(cfg, env, args.run_timeout + args.overhead_steps, cpu=True)
    if r["returncode"] != 0:
        tail = "\n".join(s for _, s in r["lines"][-20:])
        raise RuntimeError(f"launch with hang={ARMS[arm]} failed ({r['returncode']}):\n{tail}")
    run_id = next(x["id"] for x in cli_json(["runs"], env) if x["name"] == name)

    def series(key: str, rank: int) -> list[float]:
        points = cli_json(["metrics", run_id, "--key", key, "--rank", str(rank)], env)["points"]
        return [p["value"] for p in sorted(points, key=lambda p: p["step"])]

    times = [series("train/step_time_s", rank) for rank in (0, 1)]
    keys = cli_json(["metrics", run_id], env)["keys"]
    cpu_per_step, beat_per_step = [], []
    for rank in (0, 1):  # from the first logged call after warmup to the last one
        rows = [tuple(map(float, line.split())) for line in (cpu_dir / f"rank{rank}.log").read_text().splitlines()]
        rows = [row for row in rows if row[0] > args.warmup]
        steps = rows[-1][0] - rows[0][0]
        cpu_per_step.append((rows[-1][2] - rows[0][2]) / steps)
        beat = (rows[-1][3] - rows[0][3]) / steps
        beat_per_step.append(None if beat != beat else beat)  # nan: no heartbeat thread (hang.enabled=false)
    return {
        "arm": arm, "hang": ARMS[arm], "run_id": run_id, "wall_s": round(r["wall_s"], 1), "loadavg": load,
        "steps": len(times[0]), "median_step_s": [statistics.median(t[args.warmup:]) for t in times],
        "p10_step_s": [statistics.quantiles(t[args.warmup:], n=10)[0] for t in times],
        "cpu_s_per_step": cpu_per_step, "heartbeat_thread_cpu_s_per_step": beat_per_step,
        "cpu_s": r["cpu_s"], "health_keys": sorted(k for k in keys if k.startswith("health/")),
        "stall_or_alert_lines": [s for _, s in r["lines"] if s.startswith(("STALL", "ALERT"))],
    }


# --- a frozen rank: SIGSTOP, then the time to the STALL line --------------------------------------

DEMO = {"n_layer": 4, "n_head": 4, "d_model": 128}  # configs/demo.yaml's model, its batch and optimizer below


def run_freeze(i: int, arm: str, code_root: Path, data_uri: str, args, tmp: Path) -> dict:
    """The demo GPT on 2 ranks with the default hang settings and no restart; at rank 1's
    --freeze-call-th forward (past start-up) this process SIGSTOPs rank 1's worker, at a random
    moment of its heartbeat period. Measured: freeze -> the driver's STALL line, -> its flight
    recorder line. `code_root`: the checkout whose orchestrator runs (before/after a change)."""
    home = Path(tempfile.mkdtemp(prefix=f"freeze{i}-{arm}-", dir=tmp))
    mark, name = home / "marked", f"freeze-{i}-{arm}"
    cfg = home / "freeze.yaml"
    write_config(cfg, data_uri, name, max_steps=args.freeze_call + 5000,
                 model={"factory": "hang_detection:hanging_gpt",
                        "kwargs": {**DEMO, "hang_rank": -1, "mark_call": args.freeze_call, "mark_file": str(mark)}},
                 data={"global_batch_size": 32}, optim={"lr": 0.003, "warmup_steps": 30},
                 fault_tolerance={"max_restarts": 0})
    env = launch_env(home)
    # the arm's packages first; this directory for the model factory (the same in every arm)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(ROOT / "bench")])
    rng = __import__("random").Random(1000 + i)

    def freeze(proc, lines) -> dict:
        deadline = time.time() + args.run_timeout
        while time.time() < deadline and not mark.exists() and proc.poll() is None:
            time.sleep(0.05)
        if not mark.exists():
            return {"error": "rank 1 never reached the freeze call"}
        pid = int(mark.read_text().split()[1])
        time.sleep(rng.uniform(0, 1.0))  # anywhere within a heartbeat period (hang.heartbeat_s = 1)
        at = time.time()
        os.kill(pid, signal.SIGSTOP)  # a worker of the cluster this launch started
        while time.time() < at + 120 and not any(s.startswith("STALL") for _, s in lines) and proc.poll() is None:
            time.sleep(0.02)
        return {"pid": pid, "frozen_at": at}

    load = os.getloadavg()[0]
    r = launch(cfg, env, args.run_timeout, during=freeze)
    d = r["during"] or {}
    if d.get("pid") and alive(d["pid"]):  # the launch's teardown should have killed it
        os.kill(d["pid"], signal.SIGKILL)
    out: dict = {"arm": arm, "returncode": r["returncode"], "wall_s": round(r["wall_s"], 1), "loadavg": load, **d}
    if "frozen_at" not in d:
        out["tail"] = [s for _, s in r["lines"][-15:]]
        return out
    stall = next(((t, s) for t, s in r["lines"] if s.startswith("STALL")), None)
    fr = next(((t, s) for t, s in r["lines"] if stall and t >= stall[0] and "flight recorder:" in s), None)
    if stall is None:
        out.update(error="no STALL line", tail=[s for _, s in r["lines"][-15:]])
        return out
    out.update(stall_line_s=round(stall[0] - d["frozen_at"], 3), stall_line=stall[1],
               named_rank_1="rank 1 on node" in stall[1], state_t="state T" in stall[1],
               flight_recorder_s=round(fr[0] - stall[0], 3) if fr else None, flight_recorder_line=fr[1] if fr else None)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def freezes(data_uri: str, args, tmp: Path) -> dict:
    arms = {"after": Path(args.code).resolve() if args.code else ROOT}
    if args.baseline:
        arms = {"before": Path(args.baseline).resolve(), **arms}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for i in range(args.freeze_repeats):
        for arm in list(arms) if i % 2 == 0 else list(arms)[::-1]:  # A B, B A, ...
            r = run_freeze(i, arm, arms[arm], data_uri, args, tmp)
            runs[arm].append(r)
            log(f"freeze {i + 1}/{args.freeze_repeats} {arm:6s}: STALL {fmt_s(r.get('stall_line_s'))} after SIGSTOP, "
                f"flight recorder {fmt_s(r.get('flight_recorder_s'))} more, rank 1 named {r.get('named_rank_1')}, "
                f"state T {r.get('state_t')}, load {r['loadavg']:.1f}" + (f"; {r['error']}" if "error" in r else ""))
    out: dict = {"freeze_call": args.freeze_call, "model": DEMO, "arms": {a: str(p) for a, p in arms.items()}}
    for arm, rs in runs.items():
        secs = [r["stall_line_s"] for r in rs if r.get("stall_line_s") is not None]
        frs = [r["flight_recorder_s"] for r in rs if r.get("flight_recorder_s") is not None]
        out[arm] = {"stall_line_s": secs, "median_s": statistics.median(secs) if secs else None,
                    "flight_recorder_s": frs, "flight_recorder_median_s": statistics.median(frs) if frs else None,
                    "named_every_time": bool(rs) and all(r.get("named_rank_1") for r in rs), "runs": rs}
    if out.get("before", {}).get("median_s") and out["after"]["median_s"]:
        out["ratio_after_before"] = out["after"]["median_s"] / out["before"]["median_s"]
    return out


# --- the comparison ----------------------------------------------------------------------------


def prepare_data(out: Path) -> str:
    cmd = [str(BIN / "orchestrator"), "data", "prepare", str(STDLIB / "json"), str(STDLIB / "email"),
           "--out", str(out), "--seq-len", "65", "--val-fraction", "0.1", "--include", "*.py"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr, stderr=sys.stderr, timeout=300)
    return str(out)


def torch_default_timeout() -> dict:
    from torch.distributed import distributed_c10d
    from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

    return {
        "gloo_s": distributed_c10d._get_default_timeout(distributed_c10d.Backend.GLOO).total_seconds(),
        "default_pg_timeout_s": default_pg_timeout.total_seconds(),
        "nccl_s": default_pg_nccl_timeout.total_seconds() if default_pg_nccl_timeout else 600.0,
        "source": "torch/distributed/constants.py default_pg_timeout (C++ _DEFAULT_PG_TIMEOUT), returned by "
                  "distributed_c10d._get_default_timeout for non-NCCL backends when init_process_group gets no "
                  "timeout; documented in init_process_group: 10 minutes for NCCL, 30 minutes for other backends",
    }


def detection(data_uri: str, args, tmp: Path) -> dict:
    ours: list[dict] = []
    peer: dict[str, dict] = {}
    # ours, peer with our budget, peer default, ours, then any further ours
    peers = ["peer_budget", "peer_default"] if args.peer_cap_s > 0 else []
    order = ["ours"] * min(1, args.repeats) + peers + ["ours"] * max(0, args.repeats - 1)
    for side in order:
        if side == "ours":
            log(f"ours {len(ours) + 1}/{args.repeats}: launch with default hang settings, rank 1 hangs on "
                f"forward #{args.hang_call} (expect a stall report ~{HangConfig().timeout_s + 4:.0f} s later)")
            r = run_ours_hang(len(ours), data_uri, args, tmp)
            ours.append(r)
            log(f"ours {len(ours)}: STALL line {fmt_s(r.get('stall_line_s'))}, stall event {fmt_s(r.get('seconds'))} "
                f"after the hang began, culprits "
                f"{r.get('culprits')}, verdict {r.get('verdict')}, exit {r['returncode']}"
                + (f"; {r['error']}" if "error" in r else ""))
        elif side == "peer_budget":
            log(f"peer: bare torch DDP, gloo, timeout=timedelta(seconds={args.peer_timeout_s:g})")
            peer["timeout_budget"] = r = run_peer("peerbudget", args.peer_timeout_s, args.peer_cap_s + args.peer_timeout_s,
                                                  data_uri, args, tmp)
            log(f"peer {args.peer_timeout_s:g} s: raised={r.get('raised')} after {fmt_s(r.get('seconds', r.get('waited_s')))}, "
                f"names rank 1: {r.get('names_rank')}; {r.get('error_first_line', r.get('error', ''))[:160]}")
        else:
            log(f"peer: bare torch DDP, gloo, torch's default timeout, capped at {args.peer_cap_s:.0f}s")
            peer["default"] = r = run_peer("peerdefault", None, args.peer_cap_s, data_uri, args, tmp)
            log(f"peer default: raised={r.get('raised')}, {r.get('result', r.get('error_first_line', ''))}")
    secs = [r["seconds"] for r in ours if r.get("seconds") is not None]
    lines = [r["stall_line_s"] for r in ours if r.get("stall_line_s") is not None]
    return {
        "hang_call": args.hang_call,
        "ours": {
            "runs": ours,
            "seconds": secs,
            "median_s": statistics.median(secs) if secs else None,
            "stall_line_seconds": lines,
            "stall_line_median_s": statistics.median(lines) if lines else None,
            "culprit_named_every_time": bool(ours) and all(r.get("culprit_named") for r in ours),
            "settings": f"hang.* defaults (timeout_s {HangConfig().timeout_s:g}, step_time_factor 10, heartbeat_s 1), max_restarts 0",
        },
        "torch": {"default_timeout": torch_default_timeout(), **peer},
    }


def fmt_s(x) -> str:
    return f"{x:.1f}s" if isinstance(x, (int, float)) else str(x)


def overhead(data_uri: str, args, tmp: Path) -> dict:
    arms = [a.strip() for a in args.overhead_arms.split(",") if a.strip()]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for i in range(args.overhead_repeats):
        for arm in arms if i % 2 == 0 else arms[::-1]:  # A B, B A, A B, ...
            r = run_ours_steps(i, arm, data_uri, args, tmp)
            runs[arm].append(r)
            log(f"overhead {i + 1}/{args.overhead_repeats} {arm:8s}: median step "
                + " ".join(f"r{k}={m * 1e3:.2f}ms" for k, m in enumerate(r["median_step_s"]))
                + f", CPU/step r0={r['cpu_s_per_step'][0] * 1e3:.2f}ms"
                + f", wall {r['wall_s']:.0f}s, train-worker CPU {r['cpu_s'].get('train_workers', 0):.1f}s, "
                f"other CPU {r['cpu_s'].get('other', 0):.1f}s, load {r['loadavg']:.1f}")

    def side(rs: list[dict]) -> dict:
        return {
            "median_step_s_rank0": [r["median_step_s"][0] for r in rs],
            "median_step_s_rank1": [r["median_step_s"][1] for r in rs],
            "median_step_s": statistics.median(r["median_step_s"][0] for r in rs),
            "p10_step_s_rank0": [r["p10_step_s"][0] for r in rs],
            "cpu_s_per_step_rank0": [r["cpu_s_per_step"][0] for r in rs],
            "cpu_s_per_step_rank1": [r["cpu_s_per_step"][1] for r in rs],
            "cpu_s_per_step": statistics.median(c for r in rs for c in r["cpu_s_per_step"]),
            # the heartbeat thread's share of its rank's CPU (measured directly, per thread)
            "heartbeat_thread_cpu_share": [b / c for r in rs for b, c in
                                           zip(r["heartbeat_thread_cpu_s_per_step"], r["cpu_s_per_step"], strict=True)
                                           if b is not None],
            "health_monitor_cpu_s": [r["cpu_s"].get("health_monitor") for r in rs],
            "train_worker_cpu_s": [r["cpu_s"].get("train_workers") for r in rs],
            "other_cpu_s": [r["cpu_s"].get("other") for r in rs],
            "wall_s": [r["wall_s"] for r in rs],
            "loadavg_at_start": [r["loadavg"] for r in rs],
            "health_keys": rs[0]["health_keys"] if rs else [],
            "runs": rs,
        }

    sides = {a: side(rs) for a, rs in runs.items()}
    out: dict = {"steps": args.overhead_steps, "warmup": args.warmup, "repeats": args.overhead_repeats,
                 "arms": {a: ARMS[a] for a in arms}, **sides, "target_ratio": 1.01}
    base = sides.get("off")
    for a in arms:
        if a == "off" or base is None:
            continue

        def pairs(key: str, arm: str = a) -> list[float]:
            return [x / y for x, y in zip(sides[arm][key], base[key], strict=True)]

        paired = pairs("median_step_s_rank0")
        out[f"ratio_{a}_off"] = {
            "ratio": sides[a]["median_step_s"] / base["median_step_s"],
            "paired": paired, "paired_median": statistics.median(paired),
            "p10_paired": pairs("p10_step_s_rank0"),
            "cpu_per_step_ratio": sides[a]["cpu_s_per_step"] / base["cpu_s_per_step"],
            "cpu_per_step_paired": pairs("cpu_s_per_step_rank0"),
            "train_worker_cpu_s_ratio": (statistics.median(sides[a]["train_worker_cpu_s"])
                                         / statistics.median(base["train_worker_cpu_s"])),
        }
    if "ratio_on_off" in out:
        out["ratio"] = out["ratio_on_off"]["ratio"]
        out["within_target"] = out["ratio"] <= out["target_ratio"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="our hang runs (default hang settings: ~1.5 min each)")
    p.add_argument("--hang-call", type=int, default=8, help="rank 1 blocks on this training forward (1-based)")
    p.add_argument("--peer-cap-s", type=float, default=180.0,
                   help="how long the torch-default-timeout peer may wait after the hang began (0: skip both peers)")
    p.add_argument("--peer-timeout-s", type=float, default=HangConfig().timeout_s,
                   help="the second peer's timeout= (default: our hang.timeout_s, the same budget)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="bound on one launch (s), step count added")
    p.add_argument("--overhead-repeats", type=int, default=3, help="runs of each overhead arm (0: skip)")
    p.add_argument("--overhead-steps", type=int, default=3000, help="training steps per overhead run")
    p.add_argument("--overhead-arms", default="on,off",
                   help=f"comma-separated, alternated: {', '.join(f'{k} (hang={v})' for k, v in ARMS.items())}")
    p.add_argument("--warmup", type=int, default=50, help="leading steps left out of the step-time medians")
    p.add_argument("--freeze-repeats", type=int, default=0,
                   help="runs per arm of the frozen-rank section (SIGSTOP of rank 1, demo GPT; 0: skip)")
    p.add_argument("--freeze-call", type=int, default=40, help="rank 1 is frozen after this training forward")
    p.add_argument("--baseline", default=None,
                   help="a checkout of the code before a change (e.g. `git archive HEAD | tar -x -C DIR`): the "
                        "frozen-rank section runs it too, alternating with this one")
    p.add_argument("--code", default=None,
                   help="the checkout the frozen-rank section's 'after' arm runs (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (stores, configs, peer reports)")
    args = p.parse_args()
    unknown = [a for a in args.overhead_arms.split(",") if a.strip() and a.strip() not in ARMS]
    if unknown:
        p.error(f"--overhead-arms: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    if args.overhead_repeats and args.overhead_steps <= args.warmup + 1:
        p.error(f"--overhead-steps={args.overhead_steps} must exceed --warmup={args.warmup} + 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the spawned peer processes import this module and the repo's packages from ROOT
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    tmp = Path(tempfile.mkdtemp(prefix="bench-hang-"))
    started = time.time()
    load_start = os.getloadavg()
    git_start = git_state()  # others may commit while this runs
    log(f"tmp {tmp}; preparing the small dataset (stdlib json + email, 65-token sequences)")
    try:
        data_uri = prepare_data(tmp / "data")
        det = detection(data_uri, args, tmp)
        frz = freezes(data_uri, args, tmp) if args.freeze_repeats else None
        ovh = overhead(data_uri, args, tmp) if args.overhead_repeats else None
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "bench": "hang_detection",
        "world_size": 2,
        "model": MODEL,
        "detection": det,
        "frozen_rank": frz,
        "overhead": ovh,
        "wall_s": round(time.time() - started, 1),
        "loadavg_start_end": [load_start[0], os.getloadavg()[0]],
        "git": {"start": git_start, "end": git_state()},
        "machine": machine(),
    }
    o, t = det["ours"], det["torch"]
    log(f"ours: STALL line {', '.join(fmt_s(s) for s in o['stall_line_seconds'])}, stored event "
        f"{', '.join(fmt_s(s) for s in o['seconds'])} after the hang began (culprit named every time: "
        f"{o['culprit_named_every_time']}); torch with our budget: {fmt_s(t.get('timeout_budget', {}).get('seconds'))}, "
        f"names rank: {t.get('timeout_budget', {}).get('names_rank')}; torch default: "
        f"{t.get('default', {}).get('result', t.get('default', {}).get('error_first_line'))}")
    for arm in ("before", "after"):
        if frz and arm in frz:
            log(f"frozen rank, {arm}: SIGSTOP -> STALL {', '.join(fmt_s(x) for x in frz[arm]['stall_line_s'])} "
                f"(median {fmt_s(frz[arm]['median_s'])}); flight recorder {fmt_s(frz[arm]['flight_recorder_median_s'])}")
    for key, r in (ovh or {}).items():
        if key.startswith("ratio_"):
            log(f"overhead {key[6:].replace('_off', '')}/off = {r['ratio']:.4f} (paired "
                f"{', '.join(f'{x:.4f}' for x in r['paired'])}); CPU per step {r['cpu_per_step_ratio']:.4f} (paired "
                f"{', '.join(f'{x:.4f}' for x in r['cpu_per_step_paired'])})")
    if ovh and "on" in ovh:
        share = ovh["on"]["heartbeat_thread_cpu_share"]
        log(f"heartbeat thread: {statistics.median(share) * 100:.3f}% of its rank's CPU (median of {len(share)}); "
            f"HealthMonitor actor CPU per run {ovh['on']['health_monitor_cpu_s']} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
