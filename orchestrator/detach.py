"""`orchestrator launch CONFIG --address ADDR --detach`: the driver as a Ray Job, so the run
outlives the terminal that launched it.

The job runs the same `launch` (without --detach) in a copy of the working directory (user code,
the config, a script or model factory; large and private folders excluded, its size checked),
with the run id chosen here as its submission id, and ORCHESTRATOR_HOME pointing at the store
the launching CLI reads, so `runs`, `show`, `attach`, `stop` and the UI see it. It shows in the
Ray dashboard's Jobs view with the run's id, name and store as metadata.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from common.errors import ResourceError, UserError
from orchestrator import cluster
from orchestrator.config import Config, ResumeMode, redact

MAX_WORKDIR_BYTES = 100 * 1024 * 1024
AGENT_WAIT_S = 60.0  # a head that just started takes a few seconds before it takes jobs
EXCLUDES = [".git", ".venv", "venv", ".orchestrator", "__pycache__", ".pytest_cache", "node_modules", "*.pt", "*.ckpt"]
SKIP_DIRS = {".git", ".venv", "venv", ".orchestrator", "__pycache__", ".pytest_cache", "node_modules"}


def workdir_bytes(root: Path, limit: int) -> int:
    """Size of what would be shipped (stops counting past `limit`)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith((".pt", ".ckpt")):
                continue
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            if total > limit:
                return total
    return total


def job_client(address: str):
    """A JobSubmissionClient for `address`: the dashboard's http(s) address, or a cluster address
    (host:port), whose dashboard is asked for. Token authentication (Ray >= 2.59 on `ray start`
    clusters) is used when the cluster asks for it and a token is there (cluster.use_token)."""
    cluster.use_token(address)
    from ray.job_submission import JobSubmissionClient

    url = address
    if not address.startswith(("http://", "https://")):
        import ray

        try:
            url = ray.init(address=address, logging_level="ERROR").dashboard_url
        except Exception as e:  # any failure to reach the cluster is the user's address
            raise ResourceError(f"--detach: cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        finally:
            if ray.is_initialized():
                ray.shutdown()
        if not url:
            raise ResourceError(f"--detach: the Ray cluster at {address} runs no dashboard (start its head with "
                                "--include-dashboard true): Ray Jobs go through it")
        url = url if url.startswith("http") else f"http://{url}"
    try:
        return JobSubmissionClient(url), url
    except Exception as e:  # connection refused, wrong port, bad token
        raise ResourceError(f"--detach: cannot submit a job to {url}: {str(e).strip().splitlines()[0]}") from None


def submit(cfg: Config, config_path: str, overrides: list[str], *, address: str, run_id: str, store_root: Path,
           command: str, out) -> str:
    cwd = Path.cwd()
    config = Path(config_path).absolute()
    try:
        rel = config.relative_to(cwd)
    except ValueError:
        raise UserError(f"--detach: {config_path} is outside the working directory {cwd}, which is what the job "
                        "gets; run launch from a folder that holds the config") from None
    size = workdir_bytes(cwd, MAX_WORKDIR_BYTES)
    if size > MAX_WORKDIR_BYTES:
        raise UserError(f"--detach: the working directory {cwd} holds over {MAX_WORKDIR_BYTES // 2**20} MiB (without "
                        f"{', '.join(sorted(SKIP_DIRS))}); the job ships it to the cluster: put data in data.uri "
                        "(an object store) and launch from the folder with your code")
    extra = []
    for key, value in (("data.uri", cfg.data.uri), ("checkpoint.uri", cfg.checkpoint.uri)):
        if value and "://" not in value and not os.path.isabs(value):  # resolved where launch ran
            extra.append(f"{key}={os.path.abspath(value)}")
    client, url = job_client(address)
    from orchestrator.driver import SUBMITTED, record_submitted
    from orchestrator.store import Store, open_store, store_uri

    shared = store_uri(cfg.tracking.uri)  # a store named by the run or ORCHESTRATOR_STORE: the job's driver writes there
    store = open_store(shared) if shared else Store(store_root)
    env = {"ORCHESTRATOR_HOME": str(store_root), **({"ORCHESTRATOR_STORE": store.uri} if shared else {})}
    if shared and store.kind == "postgresql" and store.uri != store.path:
        raise UserError(f"--detach: the store URI {store.path} carries a password, which the job's environment would"
                        " keep in clear; give it through PGPASSWORD or ~/.pgpass on the cluster's nodes instead")
    prior = _resumable(cfg, store)
    if prior is None:
        record_submitted(cfg, run_id, store, command)
        submission_id = run_id
    else:  # the job's driver continues that run (driver.launch: a known run id with attempts)
        run_id = prior["id"]
        submission_id = f"{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"  # a Ray job id is never reused
        out(f"run.resume=auto: continuing run {run_id} ({prior['status']}) instead of starting over")
        store.reopen_run(run_id, config=redact(cfg.to_dict()))  # running again from now: attach waits for it
        store.driver_beat(run_id, host=SUBMITTED, pid=None)
    python = sys.executable if _local(address) else "python"  # a remote cluster has its own interpreter
    entry = shlex.join([python, "-m", "orchestrator.cli", "launch", str(rel), *overrides, *extra, "--run-id", run_id])
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entry, submission_id=submission_id,
                              runtime_env={"working_dir": str(cwd), "excludes": EXCLUDES,
                                           "env_vars": env},
                              metadata={"orchestrator_run_id": run_id, "run_name": cfg.run.name,
                                        "tracking": str(store.path) if shared else str(store_root)})
            break
        except Exception as e:  # the job server refused it: say why in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "No available agent" in first and time.monotonic() < deadline:
                time.sleep(2.0)  # a head that just started: its job agent comes up within seconds
                continue
            why = f"--detach: the cluster refused the job: {first}"
            if prior is None:
                store.finish_run(run_id, "failed", error=why)
            else:  # the run continued goes back to how it ended
                store.finish_run(run_id, prior["status"] if prior["status"] != "lost" else "failed",
                                 error=prior.get("error") or why)
            raise ResourceError(why) from None
    out(f"submitted run {run_id} as a Ray job (detached); Jobs view: {url}/#/jobs/{submission_id}"
        f"{cluster.sign_in_hint(url)}")
    out(f"its actors:  {url}/#/actors  (named {cfg.run.name}:{run_id}:rank<r>, :metrics, :checkpoints, :health)")
    out(f"follow it:  orchestrator attach {run_id}    (logs: orchestrator logs {run_id} --follow)")
    out(f"stop it:    orchestrator stop {run_id}")
    return run_id


def _resumable(cfg: Config, store) -> dict | None:
    """Under run.resume=auto (the KubeRay pattern: the same job submitted again), the newest
    unfinished run of this name, which the job then continues; None: a new run."""
    if cfg.run.resume is not ResumeMode.AUTO:
        return None
    prior = store.latest_named(cfg.run.name)
    if prior is None or prior["status"] == "completed":
        return None
    if prior["status"] == "running":  # its driver still beats: two drivers must never drive one run
        raise UserError(f"--detach with run.resume=auto: run {prior['id']} ({cfg.run.name}) is still running; "
                        f"`orchestrator stop {prior['id']}` first, or give another run.name")
    return prior


def _local(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")
