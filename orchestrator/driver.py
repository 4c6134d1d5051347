"""The driver: reserve, start, rendezvous, watch, and record the outcome of one run.

States: RESERVING -> STARTING -> TRAINING -> COMPLETED | FAILED | INTERRUPTED.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import statistics
import threading
import time
from dataclasses import dataclass

from orchestrator import cluster, provenance
from orchestrator.config import Config, redact
from orchestrator.errors import UserError
from orchestrator.progress import Progress, fmt_duration
from orchestrator.store import Store


class RunFailed(UserError):
    """A worker raised or died; the message names the rank, the worker's traceback is kept."""

    exit_code = 1


@dataclass
class RunHandles:
    placement: cluster.Placement | None = None
    metrics: object = None
    checkpoints: object = None
    workers: list | None = None


def new_run_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
    return f"{safe}-{stamp}-{secrets.token_hex(2)}"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
    """A scheduler's SIGTERM (SLURM, Kubernetes) stops the run the same clean way as Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def preflight(cfg: Config) -> None:
    """Checks that need no cluster: fail in a second, not after Ray has started."""
    from orchestrator.errors import ConfigError

    if not cfg.data.uri:
        raise ConfigError("data.uri: required; point it at a dataset made by `orchestrator data prepare`")
    from dataloading.index import read_index

    index = read_index(cfg.data.uri)
    n = index.num_sequences("train")
    if n < cfg.data.global_batch_size:
        raise UserError(
            f"{cfg.data.uri}: train split has {n} sequences, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size})"
        )
    if cfg.model.factory:
        from orchestrator.gpt import load_factory

        load_factory(cfg.model.factory)


def launch(cfg: Config, *, address: str | None = None, command: str = "", out=print, store: Store | None = None) -> str:
    """Run training to the end. Returns the run id; raises RunFailed / ResourceError / KeyboardInterrupt."""
    preflight(cfg)
    store = store or Store()
    run_id = new_run_id(cfg.run.name)
    s = cfg.scaling
    out(f"run {run_id}: {s.num_workers} workers x {cluster._fmt(cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker))}, "
        f"{cfg.train.max_steps} steps, store {store.path}")
    meta = provenance.collect(cfg)
    store.create_run(
        run_id=run_id, name=cfg.run.name, config=redact(cfg.to_dict()), git_commit=meta["git"]["commit"],
        host=socket.gethostname(), command=command, world_size=s.num_workers, meta=meta,
        tags=dict(t.split("=", 1) if "=" in t else (t, "") for t in cfg.run.tags),
    )
    handles = RunHandles()
    try:
        cluster.connect(address, dashboard=cfg.cluster.dashboard)
        _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler
        url = cluster.dashboard_url()
        if url:
            out(f"Ray dashboard: {url}")
        summary = _run(cfg, run_id, store, handles, out)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", error="interrupted by the user (Ctrl-C)")
        out(f"\ninterrupted: run {run_id} marked interrupted")
        _teardown(handles)
        raise
    except BaseException as e:
        store.finish_run(run_id, "failed", error=str(e))
        _teardown(handles)
        raise
    store.finish_run(run_id, "completed", summary=summary)
    _teardown(handles)
    first, last, ev = summary.get("first_loss"), summary.get("last_loss"), summary.get("eval_loss")
    loss = f"train/loss {first:.3f} -> {last:.3f}" if first is not None else ""
    loss += f", eval/loss {ev:.3f}" if ev is not None else ""
    out(f"run {run_id} completed: {summary['steps']} steps in {fmt_duration(summary['wall_time_s'])}; {loss}")
    out(f"look at it:  orchestrator show {run_id}")
    out(f"             orchestrator metrics {run_id} --key train/loss")
    return run_id


def _run(cfg: Config, run_id: str, store: Store, h: RunHandles, out) -> dict:
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    from actors.metrics_actor import MetricsActor
    from actors.train_worker import TrainWorker

    t0 = time.time()
    s = cfg.scaling
    # RESERVING
    h.placement = cluster.reserve(
        run_id=run_id, num_workers=s.num_workers, cpus=s.cpus_per_worker, gpus=s.gpus_per_worker,
        timeout_s=s.start_timeout_s,
    )
    # STARTING: the metrics actor lives on the driver's node, next to the store file.
    here = ray.get_runtime_context().get_node_id()
    h.metrics = ray.remote(MetricsActor).options(
        name=f"{cfg.run.name}:{run_id}:metrics", num_cpus=0, max_restarts=-1,  # senders replay into the restarted actor
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(run_id, str(store.root), prometheus_host=cfg.telemetry.prometheus_host,
             prometheus_port=cfg.telemetry.prometheus_port, alert_webhook=cfg.telemetry.alert_webhook)
    try:
        prometheus = ray.get(h.metrics.prometheus_address.remote())
    except ray.exceptions.RayActorError as e:
        t = cfg.telemetry
        raise UserError(f"telemetry.prometheus_port={t.prometheus_port}: cannot serve metrics on "
                        f"{t.prometheus_host}: {str(e).strip().splitlines()[-1]}") from None
    if prometheus:
        out(f"Prometheus metrics: http://{prometheus}/metrics")
    from actors import checkpoint_coordinator

    h.checkpoints = checkpoint_coordinator.start(cfg, run_id, str(store.root), here)
    ranks = cluster.assign_ranks(h.placement.bundle_nodes)
    by_rank = sorted(range(s.num_workers), key=lambda b: ranks[b]["rank"])
    h.workers = []
    for bundle in by_rank:
        worker = ray.remote(TrainWorker).options(
            name=f"{cfg.run.name}:{run_id}:rank{ranks[bundle]['rank']}",
            num_cpus=s.cpus_per_worker,
            num_gpus=s.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(h.placement.pg, placement_group_bundle_index=bundle),
        ).remote(cfg.to_dict(), h.metrics, h.checkpoints)
        h.workers.append(worker)
    infos = _gather([w.node_info.remote() for w in h.workers], "start")
    store.update_meta(run_id, workers=[{"rank": r, **info} for r, info in enumerate(infos)])
    master_addr = infos[0]["ip"]
    master_port = _gather([h.workers[0].free_port.remote()], "start")[0]
    setups = []
    for worker, bundle in zip(h.workers, by_rank, strict=True):
        r = ranks[bundle]
        setups.append(worker.setup.remote(
            rank=r["rank"], local_rank=r["local_rank"], world_size=s.num_workers,
            local_world_size=r["local_world_size"], node_rank=r["node_rank"],
            master_addr=master_addr, master_port=master_port,
        ))
    backends = _gather(setups, "rendezvous")
    nodes = len({i["node_id"] for i in infos})
    out(f"rendezvous done: {s.num_workers} ranks on {nodes} node(s), backend {backends[0]}, "
        f"master {master_addr}:{master_port} ({time.time() - t0:.1f}s)")
    # TRAINING
    refs = [w.train.remote() for w in h.workers]
    progress = Progress(cfg.train.max_steps, cfg.telemetry.progress_every_s, out)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        for ref in done:
            _gather([ref], "training", ranks=[refs.index(ref)])
        try:
            _show_alerts(ray.get(h.metrics.take_alerts.remote(), timeout=5), out)
            if progress.due():
                progress.show(ray.get(h.metrics.progress.remote(), timeout=5))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            pass  # the metrics actor is restarting; ranks keep their batches until it is back
    summaries = ray.get(refs)
    _show_alerts(ray.get(h.metrics.take_alerts.remote()), out)
    progress.show(ray.get(h.metrics.progress.remote()), final=True)
    summary = dict(summaries[0])
    summary["wall_time_s"] = time.time() - t0
    summary["step_time_s_median"] = statistics.median([x["train_time_s"] / x["steps"] for x in summaries])
    return summary


def _show_alerts(alerts: list[dict], out) -> None:
    for a in alerts:
        out(f"ALERT {a['severity']} {a['kind']}: {a['message']}")


def _gather(refs: list, phase: str, ranks: list[int] | None = None) -> list:
    """ray.get with failures turned into one RunFailed naming the rank; the worker's traceback
    becomes the error's cause so the CLI can show it once."""
    import ray

    ranks = ranks if ranks is not None else list(range(len(refs)))
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        rank = _failed_rank(refs, ranks)
        cause = e.cause if getattr(e, "cause", None) is not None else e
        lines = str(cause).strip().splitlines()
        raise RunFailed(
            f"rank {rank} failed during {phase}: {type(cause).__name__}: {lines[-1] if lines else ''}"
        ) from _WorkerTraceback(f"--- rank {rank} traceback ---\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip())
    except ray.exceptions.RayActorError as e:
        rank = _failed_rank(refs, ranks)
        raise RunFailed(f"rank {rank} died during {phase} (process killed or node lost): {str(e).splitlines()[0]}") from None


def _failed_rank(refs: list, ranks: list[int]) -> str:
    import ray

    for ref, rank in zip(refs, ranks, strict=True):
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
            return str(rank)
        except ray.exceptions.GetTimeoutError:
            continue
    return "?"


class _WorkerTraceback(Exception):
    """Carries the worker's traceback text as the cause of a RunFailed."""


def _teardown(h: RunHandles) -> None:
    import ray

    if not ray.is_initialized():
        return
    for actor in (h.workers or []) + [a for a in (h.metrics, h.checkpoints) if a is not None]:
        try:
            ray.kill(actor)
        except Exception:
            pass
    cluster.release(h.placement)
    ray.shutdown()  # stops an embedded cluster; only disconnects from an external one
