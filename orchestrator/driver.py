"""The driver: what `launch`, `resume` and `fork` share. It records the run, connects to Ray,
starts the run-level actors, hands the attempts to the controller, and records the outcome."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import threading
import time

from orchestrator import cluster, provenance
from orchestrator.config import Config, redact
from orchestrator.controller import Controller, Handles, RunFailed  # noqa: F401 (RunFailed: public)
from orchestrator.errors import UserError
from orchestrator.progress import fmt_duration
from orchestrator.store import Store


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

    index = read_index(cfg.data.uri, storage_options=cfg.data.storage_options)
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
    """A new run, trained to the end. Returns the run id; raises RunFailed / ResourceError / KeyboardInterrupt."""
    preflight(cfg)
    store = store or Store()
    run_id = new_run_id(cfg.run.name)
    _record_new_run(cfg, run_id, store, command)
    return _drive(cfg, run_id, store, out, address=address)


def fork(parent_ref: str, step: int, overrides: list[str], *, name: str | None = None, address: str | None = None,
         command: str = "", out=print, store: Store | None = None) -> str:
    """A new run starting from the parent's checkpoint at `step`, inheriting its history below it."""
    store = store or Store()
    parent = store.run(parent_ref)
    cfg = config_for(parent, overrides + ([f"run.name={name}"] if name else []))
    _check_compatible(parent, cfg)
    preflight(cfg)
    _committed_or_explain(parent, cfg, step, store)
    run_id = new_run_id(cfg.run.name)
    if cfg.checkpoint.uri and cfg.checkpoint.uri.rstrip("/") == _ckpt_uri(parent, store).rstrip("/"):
        cfg.checkpoint.uri = f"{cfg.checkpoint.uri.rstrip('/')}/forks/{run_id}"  # never write over the parent's
    _record_new_run(cfg, run_id, store, command, parent=parent["id"], fork_step=step)
    out(f"forked from {parent['id']} at step {step}")
    return _drive(cfg, run_id, store, out, address=address, restore=step, source_uri=_ckpt_uri(parent, store))


def resume(ref: str, overrides: list[str], *, address: str | None = None, out=print, store: Store | None = None) -> str:
    """Continue a failed, interrupted or completed run from its latest good checkpoint, same run id."""
    store = store or Store()
    run = store.run(ref)
    if run["status"] == "running":
        raise UserError(f"run {run['id']} is marked running; stop its driver first (or wait for it to finish)")
    cfg = config_for(run, overrides)
    _check_compatible(run, cfg)
    preflight(cfg)
    attempts = store.attempts(run["id"])
    store.reopen_run(run["id"], config=redact(cfg.to_dict()))
    out(f"resuming run {run['id']} (attempt {len(attempts)})")
    return _drive(cfg, run["id"], store, out, address=address, restore="latest", first_attempt=len(attempts))


def config_for(run: dict, overrides: list[str]) -> Config:
    """The stored (redacted) config of a run with overrides applied. Redacted values must come back
    as overrides: they were never stored."""
    from orchestrator.config import REDACTED, apply_override, config_from_dict, flatten

    raw = json.loads(json.dumps(run["config"]))
    for item in overrides:
        apply_override(raw, item)
    missing = [k for k, v in flatten(raw).items() if v == REDACTED]
    if missing:
        raise UserError(f"run {run['id']}: {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} redacted "
                        f"when stored; give {'it' if len(missing) == 1 else 'them'} again as key.path=value")
    return config_from_dict(raw)


def _check_compatible(run: dict, cfg: Config) -> None:
    """Refuse, before anything starts, overrides a checkpoint cannot take."""
    old = run["config"]
    for section, keys in (("model", ("factory", "n_layer", "n_head", "d_model")), ("data", ("uri",))):
        for key in keys:
            before, after = old.get(section, {}).get(key), getattr(getattr(cfg, section), key)
            if before != after:
                raise UserError(f"{section}.{key}={after!r} differs from the checkpoint's {before!r}: "
                                f"the saved {'weights' if section == 'model' else 'data position'} cannot be restored "
                                "into it; start a new run with `orchestrator launch` instead")


def _ckpt_uri(run: dict, store: Store) -> str:
    from checkpointing.storage import resolve_uri

    return resolve_uri(run["config"].get("checkpoint", {}).get("uri"), run["id"], str(store.root))


def _committed_or_explain(run: dict, cfg: Config, step: int, store: Store) -> None:
    from checkpointing.loader import scan
    from checkpointing.storage import open_fs

    uri = _ckpt_uri(run, store)
    fs, root = open_fs(uri, cfg.checkpoint.storage_options)
    committed = scan(fs, root).committed
    if step not in committed:
        raise UserError(f"run {run['id']} has no committed checkpoint at step {step} "
                        f"(steps with one: {', '.join(map(str, committed)) or 'none'})")


def _record_new_run(cfg: Config, run_id: str, store: Store, command: str, **lineage) -> None:
    meta = provenance.collect(cfg)
    store.create_run(
        run_id=run_id, name=cfg.run.name, config=redact(cfg.to_dict()), git_commit=meta["git"]["commit"],
        host=socket.gethostname(), command=command, world_size=cfg.scaling.num_workers, meta=meta,
        tags=dict(t.split("=", 1) if "=" in t else (t, "") for t in cfg.run.tags), **lineage,
    )


def _drive(cfg: Config, run_id: str, store: Store, out, *, address: str | None, restore=None,
           first_attempt: int = 0, source_uri: str | None = None) -> str:
    s = cfg.scaling
    out(f"run {run_id}: {s.num_workers} workers x {cluster._fmt(cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker))}, "
        f"{cfg.train.max_steps} steps, store {store.path}")
    h = Handles()
    try:
        cluster.connect(address, dashboard=cfg.cluster.dashboard)
        _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler
        url = cluster.dashboard_url()
        if url:
            out(f"Ray dashboard: {url}")
        controller = Controller(cfg, run_id, store, h, out, first_attempt=first_attempt, restore=restore,
                                source_uri=source_uri)
        summary = controller.run(lambda: _start_run_actors(cfg, run_id, store, h, out))
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", error="interrupted by the user (Ctrl-C)")
        out(f"\ninterrupted: run {run_id} marked interrupted")
        _teardown(h)
        raise
    except BaseException as e:
        store.finish_run(run_id, "failed", error=str(e))
        _teardown(h)
        raise
    store.finish_run(run_id, "completed", summary=summary)
    _teardown(h)
    first, last, ev = summary.get("first_loss"), summary.get("last_loss"), summary.get("eval_loss")
    loss = f"train/loss {first:.3f} -> {last:.3f}" if first is not None else ""
    loss += f", eval/loss {ev:.3f}" if ev is not None else ""
    restarts = f", {summary['restarts']} restart(s)" if summary.get("restarts") else ""
    out(f"run {run_id} completed: {summary['steps']} steps in {fmt_duration(summary['wall_time_s'])}{restarts}; {loss}")
    out(f"look at it:  orchestrator show {run_id}")
    out(f"             orchestrator metrics {run_id} --key train/loss")
    return run_id


def _start_run_actors(cfg: Config, run_id: str, store: Store, h: Handles, out) -> None:
    """The metrics actor and the checkpoint coordinator live on the driver's node, next to the
    store file, for the whole run (all attempts)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors import checkpoint_coordinator
    from actors.health import HealthMonitor
    from actors.metrics_actor import MetricsActor

    here = ray.get_runtime_context().get_node_id()
    t = cfg.telemetry
    h.metrics = ray.remote(MetricsActor).options(
        name=f"{cfg.run.name}:{run_id}:metrics", num_cpus=0, max_restarts=-1,  # senders replay into the restarted actor
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(run_id, str(store.root), prometheus_host=t.prometheus_host, prometheus_port=t.prometheus_port,
             alert_webhook=t.alert_webhook)
    try:
        prometheus = ray.get(h.metrics.prometheus_address.remote())
    except ray.exceptions.RayActorError as e:
        raise UserError(f"telemetry.prometheus_port={t.prometheus_port}: cannot serve metrics on "
                        f"{t.prometheus_host}: {str(e).strip().splitlines()[-1]}") from None
    if prometheus:
        out(f"Prometheus metrics: http://{prometheus}/metrics")
    h.checkpoints = checkpoint_coordinator.start(cfg, run_id, str(store.root), here)
    if cfg.hang.enabled:
        h.health = ray.remote(HealthMonitor).options(
            name=f"{cfg.run.name}:{run_id}:health", num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote()


def _teardown(h: Handles) -> None:
    import ray

    if not ray.is_initialized():
        return
    for actor in h.workers + [a for a in (h.metrics, h.checkpoints, h.health) if a is not None]:
        try:
            ray.kill(actor)
        except Exception:
            pass
    cluster.release(h.placement)
    ray.shutdown()  # stops an embedded cluster; only disconnects from an external one
