"""The driver: what `launch`, `resume` and `fork` share. It records the run, connects to Ray,
starts the run-level actors, hands the attempts to the controller, and records the outcome."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time

from checkpointing.layout import scan
from checkpointing.storage import open_fs, resolve_uri
from common.errors import UserError
from orchestrator import cluster, provenance
from orchestrator.config import (
    REDACTED,
    Config,
    ResumeMode,
    apply_override,
    config_from_dict,
    flatten,
    redact,
)
from orchestrator.controller import Controller, RunFailed  # noqa: F401 (RunFailed: public)
from orchestrator.progress import fmt_duration
from orchestrator.store import DRIVER_BEAT_S, Store, open_store
from orchestrator.validate import preflight


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



def launch(cfg: Config, *, address: str | None = None, command: str = "", out=print, store: Store | None = None,
           run_id: str | None = None) -> str:
    """A new run, trained to the end. Returns the run id; raises RunFailed / ResourceError / KeyboardInterrupt.
    run_id: chosen by a detached launch; a job started again with it (its driver was rescheduled)
    continues the run instead of starting over."""
    store = store or open_store(cfg.tracking.uri)  # the run's own store, else --store / ORCHESTRATOR_STORE / HOME
    if run_id is not None and store.has_run(run_id):  # a detached run's job
        prior = store.run(run_id)
        if not store.attempts(run_id):  # submitted, starting now
            try:
                preflight(cfg)
            except BaseException as e:  # nobody else would record why the job ended
                store.finish_run(run_id, "failed", error=str(e))
                raise
            return _drive(cfg, run_id, store, out, address=address)
        if prior["status"] == "completed":
            out(f"run {run_id} already completed")
            return run_id
        return _continue(prior, cfg, store, out, address=address)
    preflight(cfg)
    if cfg.run.resume is ResumeMode.AUTO:
        prior = store.latest_named(cfg.run.name)
        if prior is not None and prior["status"] != "completed":
            out(f"run.resume=auto: continuing run {prior['id']} ({prior['status']}) instead of starting over")
            return _continue(prior, cfg, store, out, address=address)
    run_id = run_id or new_run_id(cfg.run.name)
    _record_new_run(cfg, run_id, store, command)
    return _drive(cfg, run_id, store, out, address=address)


def fork(parent_ref: str, step: int, overrides: list[str], *, name: str | None = None, address: str | None = None,
         command: str = "", out=print, store: Store | None = None) -> str:
    """A new run starting from the parent's checkpoint at `step`, inheriting its history below it."""
    store = store or open_store()
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
    store = store or open_store()
    run = store.run(ref)
    _refuse_if_running(run)
    cfg = config_for(run, overrides)
    preflight(cfg)
    return _continue(run, cfg, store, out, address=address)


def _continue(run: dict, cfg: Config, store: Store, out, *, address: str | None) -> str:
    """The run goes on under `cfg` from its latest good checkpoint, same run id."""
    _refuse_if_running(run)
    _check_compatible(run, cfg)
    attempts = store.attempts(run["id"])
    if run["status"] == "lost":  # taking over from a driver that died: its open attempt ended with it
        out(f"run {run['id']} lost its driver (pid {run.get('driver_pid')} on {run.get('driver_host')}); taking it over")
        for a in attempts:
            if a["ended_at"] is None:
                store.end_attempt(run["id"], a["attempt"], "lost", cause="driver_lost",
                                  message="the driver stopped (killed, or its host was lost)")
    store.reopen_run(run["id"], config=redact(cfg.to_dict()))
    out(f"resuming run {run['id']} (attempt {len(attempts)})")
    return _drive(cfg, run["id"], store, out, address=address, restore="latest", first_attempt=len(attempts))


def _refuse_if_running(run: dict) -> None:
    if run["status"] == "running" and run.get("driver_host") != SUBMITTED:  # a job submitted for it: its driver
        host = run.get("driver_host") or run["host"]
        raise UserError(f"run {run['id']} is running (its driver, pid {run.get('driver_pid') or '?'} on {host}, is "
                        f"alive); stop it first, or wait for it to finish")


def config_for(run: dict, overrides: list[str]) -> Config:
    """The stored (redacted) config of a run with overrides applied. Redacted values must come back
    as overrides: they were never stored."""
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
    return resolve_uri(run["config"].get("checkpoint", {}).get("uri"), run["id"], str(store.root))


def _committed_or_explain(run: dict, cfg: Config, step: int, store: Store) -> None:
    uri = _ckpt_uri(run, store)
    fs, root = open_fs(uri, cfg.checkpoint.storage_options)
    committed = scan(fs, root).committed
    if step not in committed:
        raise UserError(f"run {run['id']} has no committed checkpoint at step {step} "
                        f"(steps with one: {', '.join(map(str, committed)) or 'none'})")


SUBMITTED = "(submitted as a Ray job)"  # the driver host of a run whose job has not started yet


def record_submitted(cfg: Config, run_id: str, store: Store, command: str) -> None:
    """A detached run, recorded where it was submitted (so `runs`, `attach` and `stop` find it at
    once); its job's driver starts it and beats from then on. A job that never starts leaves a run
    shown as lost once LOST_AFTER_S passes without a beat."""
    _record_new_run(cfg, run_id, store, command)
    store.driver_beat(run_id, host=SUBMITTED, pid=None)


def _record_new_run(cfg: Config, run_id: str, store: Store, command: str, **lineage) -> None:
    meta = provenance.collect(cfg)
    store.create_run(
        run_id=run_id, name=cfg.run.name, config=redact(cfg.to_dict()), git_commit=meta["git"]["commit"],
        host=socket.gethostname(), command=command, world_size=cfg.scaling.num_workers, meta=meta,
        tags=dict(t.split("=", 1) if "=" in t else (t, "") for t in cfg.run.tags), **lineage,
    )


STOP_POLL_S = 1.0  # how often the beat thread looks for `orchestrator stop` (one small read)


class DriverBeat:
    """Tells the store, every DRIVER_BEAT_S, that this driver is alive, so a driver that dies
    leaves a run shown as `lost` (which `resume` takes over) instead of `running` forever; and
    looks for a stop request every STOP_POLL_S, so a stop starts within a second."""

    def __init__(self, store_uri: str, run_id: str):
        self.uri, self.run_id = store_uri, run_id
        self.stop_requested = False  # `orchestrator stop RUN` was asked: the run ends as stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driver-beat", daemon=True)

    def start(self) -> DriverBeat:
        store = open_store(self.uri)
        try:
            store.driver_beat(self.run_id, host=socket.gethostname(), pid=os.getpid())  # before returning
        finally:
            store.close()
        self._thread.start()
        return self

    def _run(self) -> None:
        store = open_store(self.uri)  # its own connection: the main thread may be inside a transaction
        next_beat = time.monotonic() + DRIVER_BEAT_S
        try:
            while not self._stop.wait(STOP_POLL_S):
                try:
                    if time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + DRIVER_BEAT_S
                        store.driver_beat(self.run_id, host=socket.gethostname(), pid=os.getpid())
                    if not self.stop_requested and store.stop_requested(self.run_id):
                        self.stop_requested = True  # the controller sees it at its next tick
                except Exception:  # a busy or full store: the next round tries again
                    pass
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DRIVER_BEAT_S + 5)


def _drive(cfg: Config, run_id: str, store: Store, out, *, address: str | None, restore=None,
           first_attempt: int = 0, source_uri: str | None = None) -> str:
    s = cfg.scaling
    out(f"run {run_id}: {s.num_workers} workers x {cluster._fmt(cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker))}, "
        f"{cfg.train.max_steps} steps, store {store.path}")
    group = None
    beat = DriverBeat(store.uri, run_id).start()
    try:
        cluster.connect(address, dashboard=cfg.cluster.dashboard)
        _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler
        url = cluster.dashboard_url()
        if url:
            out(f"Ray dashboard: {url}{cluster.sign_in_hint() if address else ''}")
        # after connect(): importing Ray before it sets the loopback option would bind elsewhere
        from orchestrator.worker_group import WorkerGroup

        group = WorkerGroup(cfg, run_id, store.root, out, store_uri=store.uri)
        controller = Controller(cfg, run_id, store, group, out, first_attempt=first_attempt, restore=restore,
                                source_uri=source_uri, stop_requested=lambda: beat.stop_requested)
        summary = controller.run()
    except KeyboardInterrupt:
        beat.stop()
        if beat.stop_requested:
            store.finish_run(run_id, "stopped", error="stopped by `orchestrator stop`")
            _teardown(group)
            out(f"run {run_id} stopped on request; `orchestrator resume {run_id}` continues it from its latest "
                "checkpoint")
            return run_id
        store.finish_run(run_id, "interrupted", error="interrupted by the user (Ctrl-C)")
        out(f"\ninterrupted: run {run_id} marked interrupted")
        _teardown(group)
        raise
    except BaseException as e:
        beat.stop()
        store.finish_run(run_id, "failed", error=str(e))
        _teardown(group)
        raise
    beat.stop()
    store.finish_run(run_id, "completed", summary=summary)
    _teardown(group)
    first, last, ev = summary.get("first_loss"), summary.get("last_loss"), summary.get("eval_loss")
    loss = f"train/loss {first:.3f} -> {last:.3f}" if first is not None else ""
    loss += f", eval/loss {ev:.3f}" if ev is not None else ""
    restarts = f", {summary['restarts']} restart(s)" if summary.get("restarts") else ""
    # a script that never called worker.log reports no steps: say nothing about them rather than 0
    steps = f"{summary['steps']} steps in " if summary.get("steps") else "in "
    out(f"run {run_id} completed: {steps}{fmt_duration(summary['wall_time_s'])}{restarts}" + (f"; {loss}" if loss else ""))
    out(f"look at it:  orchestrator show {run_id}")
    out(f"             orchestrator metrics {run_id} --key train/loss")
    return run_id


def _teardown(group) -> None:
    if group is not None:
        group.teardown()
    else:
        import ray

        if ray.is_initialized():
            ray.shutdown()
