"""FSDP vs DDP on the demo GPT: step time and checkpoint stall, side by side in one run.

Both sides are our real launch path (`orchestrator launch configs/demo.yaml` with overrides, on ONE
local Ray cluster this script starts on 127.0.0.1; the runs take turns, alternating order each
repeat so machine noise hits both alike). The only difference is `parallelism.strategy`:

- ddp: DistributedDataParallel; checkpoints replicated (rank 0 writes model.pt + optim.pt).
- fsdp: FSDP2 fully_shard per transformer block; checkpoints sharded (every rank writes its DCP
  shard; DCP's save runs in the writer's background thread over a gloo group of its own).

Figures, from the run's tracking store (what `orchestrator metrics` shows):
- step time: median `train/step_time_s` (mean over ranks) after --warmup steps, leaving out the
  steps that carry a checkpoint's stall (those are the stall figure);
- checkpoint stall: `ckpt/blocked_s`, the slowest rank's, per checkpoint (the first one apart:
  FSDP's includes making the checkpoint process group); upload time and bytes per checkpoint.

Progress on stderr; one JSON object is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_state, machine  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STRATEGIES = ("ddp", "fsdp")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def cli_json(home: Path, *args: str):
    proc = cli(home, *args, "--json", timeout=120)
    if proc.returncode:
        raise RuntimeError(f"orchestrator {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def run_one(strategy: str, i: int, args, data_uri: str, tmp: Path, gcs: str) -> dict:
    home = tmp / f"home-{strategy}-{i}"
    overrides = [
        f"data.uri={data_uri}", f"parallelism.strategy={strategy}", f"run.name={strategy}-{i}",
        f"scaling.num_workers={args.workers}", f"train.max_steps={args.steps}", "train.eval_every=0",
        f"train.precision={args.precision}", f"train.grad_accum_steps={args.accum}",
        f"checkpoint.uri={tmp / f'ck-{strategy}-{i}'}", f"checkpoint.every_steps={args.ckpt_every}",
        "checkpoint.keep_last=2", "telemetry.system_every_s=0", "telemetry.progress_every_s=30",
    ]
    started = time.time()
    proc = cli(home, "launch", str(ROOT / args.config), "--address", gcs, *overrides)
    if proc.returncode:
        raise RuntimeError(f"{strategy} run {i} failed: {proc.stderr.strip().splitlines()[-1:]}")
    run_id = cli_json(home, "runs")[-1]["id"]

    def points(key: str) -> dict[int, dict]:
        return {p["step"]: p for p in cli_json(home, "metrics", run_id, "--key", key)["points"]}

    step_time = points("train/step_time_s")
    stalled = {s for s in step_time if s > 0 and s % args.ckpt_every == 0}  # their time holds a checkpoint's stall
    steady = [p["value"] for s, p in sorted(step_time.items()) if s >= args.warmup and s not in stalled]
    blocked = [p["max"] for _, p in sorted(points("ckpt/blocked_s").items())]
    upload = [p["max"] for _, p in sorted(points("ckpt/upload_s").items())]
    ckpts = [c for c in cli_json(home, "checkpoints", run_id)["checkpoints"] if c["status"] == "committed"]
    loss = points("train/loss")
    return {
        "strategy": strategy,
        "step_time_s_median": statistics.median(steady),
        "steps_measured": len(steady),
        "ckpt_blocked_s_first": blocked[0],
        "ckpt_blocked_s_median_rest": statistics.median(blocked[1:]),
        "ckpt_upload_s_median": statistics.median(upload),
        "ckpt_bytes": ckpts[-1]["bytes"] if ckpts else None,
        "checkpoints": len(blocked),
        "final_loss": loss[max(loss)]["value"],
        "wall_s": round(time.time() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step time")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps")
    p.add_argument("--config", default="configs/demo.yaml", help="the recipe both sides train (model, batch, optim)")
    p.add_argument("--data", default=None, help="a prepared dataset; default: part of the stdlib at seq_len 129 "
                                                "(the demo's shape) in a temp folder")
    args = p.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    sys.path.insert(0, str(ROOT))
    import logging

    import ray

    from dataloading.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="fsdp-bench-"))
    started = time.time()
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    try:
        data_uri = args.data
        if data_uri is None:
            data_uri = str(tmp / "data")
            sources = [str(STDLIB / d) for d in ("json", "email", "http", "asyncio", "unittest")]
            prepare(sources, data_uri, seq_len=129, val_fraction=0.01, include=["*.py"], log=lambda *a: None)
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        gcs = ray.get_runtime_context().gcs_address
        facts = machine(loadavg_start=os.getloadavg())
        log(f"cluster {gcs}; {facts}")
        for i in range(args.repeats):
            order = STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]
            for strategy in order:
                log(f"repeat {i + 1}/{args.repeats}: {strategy} ...")
                r = run_one(strategy, i, args, data_uri, tmp, gcs)
                runs[strategy].append(r)
                log(f"  {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})}")
        facts["loadavg_end"] = os.getloadavg()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    keys = ("step_time_s_median", "ckpt_blocked_s_first", "ckpt_blocked_s_median_rest", "ckpt_upload_s_median",
            "ckpt_bytes", "final_loss")
    summary = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    paired = {k: [round(f[k] / d[k], 3) for f, d in zip(runs["fsdp"], runs["ddp"], strict=True)]
              for k in ("step_time_s_median", "ckpt_blocked_s_median_rest", "ckpt_upload_s_median")}
    report = {
        "bench": "fsdp_vs_ddp",
        "command": "python bench/fsdp_vs_ddp.py " + " ".join(sys.argv[1:]),
        "setup": vars(args),
        "machine": facts,
        "git": git_state(),
        "summary": summary,
        "ratio_fsdp_over_ddp": {k: round(summary["fsdp"][k] / summary["ddp"][k], 3)
                                for k in ("step_time_s_median", "ckpt_blocked_s_median_rest", "ckpt_upload_s_median",
                                          "ckpt_bytes")},
        "ratio_fsdp_over_ddp_paired": {k: {"median": statistics.median(v), "all": v} for k, v in paired.items()},
        "wall_s": round(time.time() - started, 1),
        "runs": runs,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
