"""Per-step time of the built-in GPT loop before and after it became a function on ctx, side by
side in one run: does the switch cost anything?

A (old): a copy of this tree with the loop as it is in a git commit (--old, default HEAD):
   its orchestrator/training.py `train` and its rank.run calling it, everything else the same. Imported through PYTHONPATH, by the driver and (its environment) every Ray worker.
B (new): this tree, where the built-in loop is orchestrator/gpt_function.py `train_gpt` on ctx.

Both are the real launch path (`orchestrator launch configs/demo.yaml`, embedded Ray) on the same
recipe, seed and data, with no entrypoint (the built-in loop). Runs alternate A B B A ... so noise
and drift hit both alike; per run, the median of each rank's `train/step_time_s` after --warmup
steps, then medians over runs and the median of each round's paired ratio (new / old). The loss at
every step must be equal on both sides (`losses_equal`: the rewrite changed no number). Also CPU
seconds per step and rank (`sys/process_cpu_s` slope), which move less with the machine's load.

Prints progress to stderr and one JSON object on the last stdout line.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_state, machine, medians, paired_ratio, tree_cpu  # noqa: E402
from launch_overhead import BIN, ROOT, cli_json, cpu_per_step, ensure_data, log  # noqa: E402


def old_copy(dest: Path, commit: str) -> None:
    """This tree's files (tracked and untracked, not ignored), with the loop as of `commit`:
    its orchestrator/training.py, and its rank.run (the rest of rank.py as it is here)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    def at_commit(name: str) -> str:
        return subprocess.run(["git", "show", f"{commit}:{name}"], cwd=ROOT, capture_output=True, check=True,
                              text=True).stdout

    (dest / "orchestrator/training.py").write_text(at_commit("orchestrator/training.py"))
    run_of = lambda text: text[text.index("\ndef run("):text.index("\ndef _load(")]  # noqa: E731
    here = (ROOT / "orchestrator/rank.py").read_text()
    (dest / "orchestrator/rank.py").write_text(here.replace(run_of(here), run_of(at_commit("orchestrator/rank.py"))))


def launch(tree: Path, config: str, overrides: list[str], name: str, home: Path, world: int, warmup: int) -> dict:
    """`orchestrator launch` with the code of `tree` (driver and, through the environment the
    embedded Ray inherits, every worker)."""
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home), "PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "orchestrator"), "launch", str(tree / config), *overrides, f"run.name={name}"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=err, text=True)
        tree_cpu(proc, {"TrainWorker": "train_workers"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"bench: `{' '.join(cmd)}` failed ({proc.returncode}):\n{err.read()[-2000:]}")
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    run_id = next(r["id"] for r in cli_json(["runs"], env) if r["name"] == name)

    def points(key: str, rank: int) -> list[tuple[int, float]]:
        got = cli_json(["metrics", run_id, "--key", key, "--rank", str(rank)], env)["points"]
        return sorted((p["step"], p["value"]) for p in got)

    step_s = [statistics.median([v for _, v in points("train/step_time_s", r)][warmup:]) for r in range(world)]
    cpu = [c for c in (cpu_per_step(points("sys/process_cpu_s", r), warmup) for r in range(world)) if c is not None]
    return {"step_s": statistics.median(step_s), "cpu_s_per_step": statistics.median(cpu) if cpu else None,
            "loss": [v for _, v in points("train/loss", 0)], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="recipe both sides train (relative to the repo)")
    p.add_argument("--steps", type=int, default=80, help="training steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the step-time medians")
    p.add_argument("--old", default="HEAD", help="git commit whose tree is side A (the loop before the switch)")
    args = p.parse_args()
    if args.steps <= args.warmup + 1:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup} + 1")

    from orchestrator.config import load_config

    cfg0 = load_config(ROOT / args.config)
    data_uri = (ROOT / cfg0.data.uri).resolve()
    ensure_data(data_uri)
    overrides = [f"train.max_steps={args.steps}", "train.eval_every=0", "cluster.dashboard=false", f"data.uri={data_uri}"]
    world = load_config(ROOT / args.config, overrides).scaling.num_workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpt-on-ctx-"))
    old_tree = tmp / "old"
    old_tree.mkdir()
    old_copy(old_tree, args.old)
    trees = {"old": old_tree, "new": ROOT}
    log(f"{args.repeats} x (old {args.old}, new), {args.steps} steps, {world} ranks, warmup {args.warmup}; tmp {tmp}")
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for i in range(args.repeats):
            for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                load = os.getloadavg()[0]
                r = launch(trees[side], args.config, overrides, f"{side}-{i}", tmp / "home", world, args.warmup)
                r["loadavg"] = load
                runs[side].append(r)
                log(f"repeat {i + 1}/{args.repeats} {side}: median step {r['step_s'] * 1e3:.1f} ms, "
                    f"wall {r['wall_s']:.1f} s, last loss {r['loss'][-1]:.4f}, load {load:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    keys = ("step_s", "cpu_s_per_step", "wall_s")
    out = {"bench": "gpt_on_ctx", "config": args.config, "old": args.old, "steps": args.steps, "repeats": args.repeats,
           "warmup": args.warmup, "world": world, "old_loop": medians(runs["old"], keys, 5),
           "new_loop": medians(runs["new"], keys, 5)}
    for key in ("step_s", "cpu_s_per_step"):
        mine, peer = out["new_loop"].get(key, {}).get("median"), out["old_loop"].get(key, {}).get("median")
        out[f"{key}_ratio"] = paired_ratio(runs["new"], runs["old"], key, mine, peer)
    losses = [r["loss"] for side in runs.values() for r in side]
    out["losses_equal"] = len(losses[0]) == args.steps and all(x == losses[0] for x in losses)
    out["loadavg"] = [r["loadavg"] for side in runs.values() for r in side]
    out["machine"] = machine()
    out["git"] = git_state()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
