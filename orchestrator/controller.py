"""The control loop of one run: start a worker group, watch it, and on failure decide (through
the restart policy) whether to rebuild it from the latest committed checkpoint.

States: RESERVING -> STARTING -> TRAINING -> (RESTARTING -> RESERVING ...) -> DONE | FAILED.
The run-level actors (metrics, checkpoint coordinator) live across attempts; the worker group
and its placement group are rebuilt for each attempt.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

from orchestrator import cluster
from orchestrator.config import Config, OnNonFinite, StragglerAction
from orchestrator.errors import NonFiniteLoss, ResourceError, UserError
from orchestrator.hang import attribute, stall_threshold_s
from orchestrator.policy import Decision, Failure, FailureKind, RestartPolicy
from orchestrator.progress import Progress
from orchestrator.stall import check_suspects, collect_flight_recorder
from orchestrator.store import Store

AVOID_WAIT_S = 10.0  # how long to look for room away from a culprit node before using it again


class RunFailed(UserError):
    """The run cannot go on; the message names the rank, the worker's traceback is kept."""

    exit_code = 1


class WorkerTraceback(Exception):
    """Carries a worker's traceback text as the cause of a RunFailed, shown once by the CLI."""


class GroupFailed(Exception):
    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class Handles:
    placement: cluster.Placement | None = None
    metrics: object = None
    checkpoints: object = None
    health: object = None
    workers: list = field(default_factory=list)


class Controller:
    def __init__(self, cfg: Config, run_id: str, store: Store, h: Handles, out, *, first_attempt: int = 0,
                 restore: int | str | None = None, source_uri: str | None = None):
        """restore: None (fresh start), "latest" (resume), or a step (a fork: that checkpoint of the
        parent's, at `source_uri`, until this run has committed one of its own)."""
        self.cfg, self.run_id, self.store, self.h, self.out = cfg, run_id, store, h, out
        self.first_attempt = first_attempt
        self.restore = restore
        self.source = (source_uri, restore) if source_uri is not None else None
        ft = cfg.fault_tolerance
        self.policy = RestartPolicy(max_restarts=ft.max_restarts, backoff_s=ft.backoff_s)
        self.last_step = -1  # last step every rank completed, as the metrics actor saw it
        self.max_step = -1  # last step any rank completed: what a failure loses is counted from here
        self.world = cfg.scaling.num_workers  # the current group's size (smaller while elastic)
        self.nodes: list[str] = []  # node id of each rank of the current group
        self.next_grow_check = 0.0  # elastic: when to look for capacity again (monotonic)
        self.grow_after: int | None = None  # elastic: regrow once a checkpoint newer than this commits
        self.skipped: list[int] = []  # global batches left out after a non-finite loss (on_nonfinite=rollback)
        self.attempt = first_attempt
        self.acting_on: tuple[int, dict] | None = None  # (event id, data) of the stall or straggler being acted on
        self.avoid_nodes: list[str] = []  # culprit nodes of earlier stalls and replaced stragglers
        self.replace: dict | None = None  # a straggler to replace at the next checkpoint (hang.straggler_action)
        self.next_replace_check = 0.0
        self.restarts = 0

    # --- the loop -----------------------------------------------------------------------

    def run(self, start_run_actors) -> dict:
        """start_run_actors(): creates h.metrics and h.checkpoints (once per run)."""
        t0 = time.time()
        attempt, failed_at, restore = self.first_attempt, None, self.restore
        while True:
            self._reserve()
            if self.h.metrics is None:
                start_run_actors()
            source_uri, step0 = self._restore_from(restore)
            self.store.start_attempt(self.run_id, attempt, resumed_from_step=step0)
            import ray

            ray.get(self.h.metrics.set_attempt.remote(attempt))
            try:
                summary = self._attempt(attempt, step0, source_uri, failed_at)
            except GroupFailed as g:
                failed_at = time.time()
                f = g.failure
                self._poll_steps()
                _, resume_at = self._restore_from("latest")  # where a restart would pick up
                lost = max(0, self.max_step + 1 - (resume_at or 0))
                planned = f.kind in (FailureKind.RESIZE, FailureKind.STRAGGLER)  # ended on purpose, at a checkpoint
                status = {FailureKind.RESIZE: "resized", FailureKind.STRAGGLER: "replaced"}.get(f.kind, "failed")
                self.store.end_attempt(self.run_id, attempt, status, cause=f.kind.value,
                                       message=f.message, rank=f.rank, node=f.node_id, failed_step=self.max_step,
                                       steps_lost=lost)
                kind = {FailureKind.RESIZE: "resize", FailureKind.STRAGGLER: "straggler_replaced"}.get(
                    f.kind, f"failure_{f.kind.value}")
                self.store.add_event(self.run_id, kind=kind,
                                     severity="info" if planned else "error", message=f.message,
                                     step=self.last_step, rank=f.rank, data={"attempt": attempt, **f.data})
                self._stop_group()
                if f.kind is FailureKind.HANG:
                    self._after_stall()
                decision = self.policy.decide(f, self.restarts)
                if f.kind is FailureKind.NON_FINITE:
                    if self.cfg.fault_tolerance.on_nonfinite is OnNonFinite.FAIL:
                        decision = Decision.RAISE
                    elif f.data.get("batch") is not None:
                        self.skipped.append(f.data["batch"])
                        self.out(f"skipping global batch {f.data['batch']} (non-finite loss) after the rollback")
                if decision is Decision.RAISE:
                    cause = WorkerTraceback(f.traceback) if f.traceback else None
                    why = "" if f.kind is FailureKind.USER_ERROR else (
                        f" (after {self.restarts} restart{'s' if self.restarts != 1 else ''}; "
                        f"fault_tolerance.max_restarts={self.policy.max_restarts})" if self.restarts else "")
                    raise RunFailed(f.message + why) from cause
                if f.kind is FailureKind.RESIZE:
                    self.out(f"RESIZE: {f.message}")
                else:
                    self.restarts += 1
                    delay = self.policy.delay_s(self.restarts - 1)
                    self.out(f"RESTART {self.restarts}/{self.policy.max_restarts}: {f.message}; "
                             f"restoring the latest checkpoint in {delay:.1f}s")
                    time.sleep(delay)
                attempt, restore = attempt + 1, "latest"
                self.last_step = self.max_step = -1
                continue
            self.store.end_attempt(self.run_id, attempt, "completed")
            summary["wall_time_s"] = time.time() - t0
            summary["restarts"] = self.restarts
            return summary

    def _reserve(self) -> None:
        """A placement group for the whole group, or (elastic, scaling.min_workers) for the largest
        size that fits now and divides the global batch, so the data order stays the same."""
        if self.h.placement is not None:
            return
        s, batch = self.cfg.scaling, self.cfg.data.global_batch_size
        sizes = [s.num_workers]
        if s.min_workers is not None:
            sizes = [n for n in range(s.num_workers, s.min_workers - 1, -1) if batch % n == 0]
        if len(sizes) == 1:
            self.h.placement = self._reserve_group(sizes[0], s.start_timeout_s)
            self.world = sizes[0]
            return
        deadline = time.monotonic() + s.start_timeout_s
        while True:
            for n in sizes:
                try:
                    self.h.placement = self._reserve_group(n, 2.0)
                except ResourceError as e:
                    last_error = e
                    continue
                self.world = n
                if n < s.num_workers:
                    self.out(f"elastic: {n} of {s.num_workers} workers fit now; going on with {n} "
                             f"(global batch {batch} stays, {batch // n} per rank)")
                return
            if time.monotonic() >= deadline:
                raise ResourceError(f"{last_error} (elastic: tried {', '.join(map(str, sizes))} workers)")

    def _reserve_group(self, n: int, timeout_s: float) -> cluster.Placement:
        """Reserve n workers; after a stall with a culprit node, first try without that node
        (hang.avoid_culprit_node), falling back to it when the cluster has no room elsewhere."""
        s = self.cfg.scaling
        kw = dict(run_id=self.run_id, num_workers=n, cpus=s.cpus_per_worker, gpus=s.gpus_per_worker)
        if self.avoid_nodes:
            names = cluster.node_labels(self.avoid_nodes)
            try:
                placement = cluster.reserve(**kw, timeout_s=min(timeout_s, AVOID_WAIT_S), avoid_nodes=self.avoid_nodes)
                self._placed(f"restarted without node {names}")
                return placement
            except ResourceError:
                placement = cluster.reserve(**kw, timeout_s=timeout_s)
                self._placed(f"no spare capacity outside node {names}: restarted on it")
                return placement
        return cluster.reserve(**kw, timeout_s=timeout_s)

    def _placed(self, note: str) -> None:
        self.out(note)
        if self.acting_on is not None:  # the stall or straggler that asked for it: its event says what was done
            event_id, data = self.acting_on
            data["placement"] = note
            self.store.update_event_data(event_id, data)

    def _restore_from(self, restore: int | str | None) -> tuple[str | None, int | None]:
        """(checkpoint location, step) the next attempt starts from; (None, None) is step 0."""
        if restore is None:
            return None, None
        import ray

        from checkpointing.loader import scan
        from checkpointing.storage import open_fs

        uri = ray.get(self.h.checkpoints.info.remote())["uri"]
        fs, root = open_fs(uri, self.cfg.checkpoint.storage_options)
        committed = scan(fs, root).committed
        if restore == "latest" and committed:
            return None, committed[-1]  # None: the run's own location, which the workers know
        if self.source is not None:  # a fork with no checkpoint of its own yet
            return self.source
        if restore == "latest":
            return None, None  # nothing committed yet: start over from step 0
        raise UserError(f"no committed checkpoint at step {restore} in {uri} "
                        f"(steps with one: {', '.join(map(str, committed)) or 'none'})")

    # --- one attempt --------------------------------------------------------------------

    def _attempt(self, attempt: int, step0: int | None, source_uri: str | None, failed_at: float | None) -> dict:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.train_worker import TrainWorker

        t0 = time.time()
        self.attempt, self.acting_on, self.replace = attempt, None, None
        s, h = self.cfg.scaling, self.h
        ranks = cluster.assign_ranks(h.placement.bundle_nodes)
        by_rank = sorted(range(self.world), key=lambda b: ranks[b]["rank"])
        h.workers = [
            ray.remote(TrainWorker).options(
                name=f"{self.cfg.run.name}:{self.run_id}:rank{ranks[b]['rank']}" + (f":a{attempt}" if attempt else ""),
                num_cpus=s.cpus_per_worker,
                num_gpus=s.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(h.placement.pg, placement_group_bundle_index=b),
            ).remote(self.cfg.to_dict(), h.metrics, h.checkpoints, h.health)
            for b in by_rank
        ]
        self.nodes = [ranks[b]["node_id"] for b in by_rank]
        infos = self._gather([w.node_info.remote() for w in h.workers], "start")
        self.store.update_meta(self.run_id, workers=[{"rank": r, **info} for r, info in enumerate(infos)])
        master_addr = infos[0]["ip"]
        master_port = self._gather([h.workers[0].free_port.remote()], "start")[0]
        setups = [
            w.setup.remote(rank=ranks[b]["rank"], local_rank=ranks[b]["local_rank"], world_size=self.world,
                           local_world_size=ranks[b]["local_world_size"], node_rank=ranks[b]["node_rank"],
                           master_addr=master_addr, master_port=master_port)
            for w, b in zip(h.workers, by_rank, strict=True)
        ]
        backends = self._gather(setups, "rendezvous")
        n_nodes = len({i["node_id"] for i in infos})
        resumed = f", resuming at step {step0}" if step0 is not None else ""
        self.out(f"rendezvous done: {self.world} ranks on {n_nodes} node(s), backend {backends[0]}, "
                 f"master {master_addr}:{master_port} ({time.time() - t0:.1f}s){resumed}")
        if h.health is not None:
            ray.get(h.health.reset.remote())
        refs = [w.train.remote(restore_step=step0, restore_uri=source_uri, skipped=self.skipped) for w in h.workers]
        self._watch(refs, step0, failed_at, attempt)
        summaries = self._gather(refs, "training")
        summary = dict(summaries[0])
        summary["step_time_s_median"] = statistics.median([x["train_time_s"] / max(1, x["steps"]) for x in summaries])
        return summary

    def _watch(self, refs: list, step0: int | None, failed_at: float | None, attempt: int) -> None:
        import ray

        progress = Progress(self.cfg.train.max_steps, self.cfg.telemetry.progress_every_s, self.out)
        self.advanced_at, self.seen_progress = time.monotonic(), 0
        # ray.wait returns at once when a rank finishes or fails, so failures are seen immediately;
        # the timeout only paces the progress poll, which costs CPU the ranks would otherwise use
        tick = min(self.cfg.telemetry.progress_every_s, 2.0)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=tick)
            for ref in done:
                self._gather([ref], "training", ranks=[refs.index(ref)])
            try:
                polled = ray.get(self.h.metrics.poll.remote(), timeout=5)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue  # the metrics actor is restarting; ranks keep their batches until it is back
            for a in polled["alerts"]:
                self.out(f"ALERT {a['severity']} {a['kind']}: {a['message']}")
                if a["kind"] == "straggler":
                    self._on_straggler(a)
            p = polled["progress"]
            self.last_step = max(self.last_step, p.get("step", -1))
            self.max_step = max(self.max_step, p.get("max_step", -1))
            if failed_at is not None and self.last_step >= (step0 or 0):
                self.store.set_recovery(self.run_id, attempt, time.time() - failed_at)
                self.out(f"recovered: step {self.last_step + 1} done {time.time() - failed_at:.1f}s after the failure")
                failed_at = None
            if progress.due():
                progress.show(p)
            self._watchdog(p)
            self._maybe_grow()
            self._maybe_replace()
        for a in ray.get(self.h.metrics.take_alerts.remote()):
            self.out(f"ALERT {a['severity']} {a['kind']}: {a['message']}")
        progress.show(ray.get(self.h.metrics.progress.remote()), final=True)

    def _watchdog(self, progress: dict) -> None:
        """Declare a stall when no rank completes a step for max(hang.timeout_s, k x median step
        time); name the culprit from the heartbeats, record the diagnosis, and fail the group."""
        import ray

        if self.h.health is None:
            return
        now = time.monotonic()
        try:
            beats = ray.get(self.h.health.snapshot.remote(), timeout=5)
        except Exception:
            return
        step = max((b["step"] for b in beats.values()), default=-1)
        moved = max((b.get("progress", 0) for b in beats.values()), default=0)  # steps and eval batches
        if moved > self.seen_progress:
            self.seen_progress, self.advanced_at = moved, now
            return
        hang = self.cfg.hang
        median = progress.get("median_step_time_s")
        limit = stall_threshold_s(hang.timeout_s, [median] if median else [], hang.step_time_factor)
        if step < 0:  # no step done yet in this group: start-up, a restore and the first batch take longer
            limit = max(limit, hang.first_step_timeout_s)
        if now - self.advanced_at < limit:
            return
        wall = time.time()
        for r in range(self.world):  # a rank that never reported counts as stopped since the start
            beats.setdefault(r, {"rank": r, "step": -1, "phase": "start", "progress": 0, "coll_entered": 0, "coll_completed": 0,
                                 "time": wall - (now - self.advanced_at)})
        report = attribute(beats, now=wall, heartbeat_s=hang.heartbeat_s, nodes=dict(enumerate(self.nodes)))
        report.update(stalled_s=round(now - self.advanced_at, 1), threshold_s=round(limit, 1), step=step)
        culprit = report["culprits"][0] if report["culprits"] else None
        who = (f"rank {', '.join(map(str, report['culprits']))} on node {', '.join(report['culprit_nodes'])}"
               if report["culprits"] else "no single rank")
        msg = f"stall: no step completed for {report['stalled_s']}s after step {step}; {who}: {report['reason']}"
        self.out(f"STALL {msg}")
        event_id = self.store.add_event(self.run_id, kind="stall", severity="error", message=msg, step=step,
                                        rank=culprit, data=report)
        self.acting_on = (event_id, report)
        if hang.flight_recorder_entries:
            folder = self.store.root / "diagnostics" / self.run_id / f"attempt{self.attempt}-step{step}"
            report["flight_recorder"] = fr = collect_flight_recorder(self.h.health, self.world, report, folder,
                                                                     hang.heartbeat_s)
            self.out(f"  flight recorder: {fr['summary']}")
            self.store.update_event_data(event_id, report)
        raise GroupFailed(Failure(FailureKind.HANG, msg, rank=culprit, node_id=self._node(culprit),
                                  data={k: report[k] for k in ("verdict", "culprits", "culprit_nodes")}))

    def _after_stall(self) -> None:
        """Once the hung group is gone: check the suspect nodes, mark the culprit's node to avoid
        on restart (hang.avoid_culprit_node), and complete the stored report."""
        if self.acting_on is None:
            return
        event_id, report = self.acting_on
        hang = self.cfg.hang
        if hang.node_checks:
            report["node_checks"] = check_suspects(report, self.nodes, hang.node_check_timeout_s, self.out)
        if hang.avoid_culprit_node:
            self.avoid_nodes = sorted(set(self.avoid_nodes) | set(report["culprit_nodes"]))
        self.store.update_event_data(event_id, report)

    def _on_straggler(self, alert: dict) -> None:
        """hang.straggler_action=restart: replace the straggler at the next checkpoint (no work
        lost), away from its node when the cluster has room; never when restarts are used up."""
        if self.cfg.hang.straggler_action is not StragglerAction.RESTART or self.replace is not None:
            return
        rank, node = alert["rank"], self._node(alert["rank"])
        if self.restarts >= self.policy.max_restarts:
            self.out(f"straggler rank {rank} not replaced: fault_tolerance.max_restarts={self.policy.max_restarts} "
                     "is used up; going on")
            return
        _, latest = self._restore_from("latest")
        self.replace = {"event": (alert["id"], alert["data"]), "rank": rank, "node": node, "after": latest or 0}
        self.out(f"straggler rank {rank} (node {cluster.node_label(node)}) will be replaced at the next checkpoint")

    def _maybe_replace(self) -> None:
        r = self.replace
        if r is None or time.monotonic() < self.next_replace_check:
            return
        self.next_replace_check = time.monotonic() + 2.0
        _, latest = self._restore_from("latest")
        if (latest or 0) <= r["after"]:
            return
        self.replace = None
        self.acting_on = r["event"]
        if r["node"]:
            self.avoid_nodes = sorted(set(self.avoid_nodes) | {r["node"]})
        raise GroupFailed(Failure(FailureKind.STRAGGLER, f"replacing straggler rank {r['rank']} on node "
                                  f"{cluster.node_label(r['node'])} at the checkpoint of step {latest}",
                                  rank=r["rank"], node_id=r["node"], step=latest))

    def _poll_steps(self) -> None:
        """One more look at the ranks' progress right after a failure (no waiting: a restart is urgent)."""
        import ray

        try:
            p = ray.get(self.h.metrics.progress.remote(), timeout=2)
        except Exception:  # the metrics actor is restarting: keep what we saw last
            return
        self.last_step = max(self.last_step, p.get("step", -1))
        self.max_step = max(self.max_step, p.get("max_step", -1))

    def _maybe_grow(self) -> None:
        """While elastic and short of workers: once capacity for the full group is back, restart
        at the next committed checkpoint (so no step is lost) with every worker."""
        s = self.cfg.scaling
        if self.world >= s.num_workers or time.monotonic() < self.next_grow_check:
            return
        self.next_grow_check = time.monotonic() + 2.0
        import ray

        free = ray.available_resources()
        missing = s.num_workers - self.world
        if free.get("CPU", 0) < missing * s.cpus_per_worker or free.get("GPU", 0) < missing * s.gpus_per_worker:
            self.grow_after = None
            return
        _, latest = self._restore_from("latest")
        latest = latest or 0
        if self.grow_after is None:
            self.grow_after = latest
            self.out(f"elastic: capacity for {s.num_workers} workers is back; regrowing at the next checkpoint")
        elif latest > self.grow_after:
            self.grow_after = None
            raise GroupFailed(Failure(FailureKind.RESIZE, f"regrowing from {self.world} to {s.num_workers} workers "
                                      f"at the checkpoint of step {latest}", step=latest))

    # --- failures -----------------------------------------------------------------------

    def _gather(self, refs: list, phase: str, ranks: list[int] | None = None) -> list:
        """ray.get, with a failure turned into GroupFailed naming the rank, its node and the cause."""
        import ray

        ranks = ranks if ranks is not None else list(range(len(refs)))
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            rank = self._failed_rank(refs, ranks)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            lines = str(cause).strip().splitlines()
            kind, data = FailureKind.EXCEPTION, {}
            if isinstance(cause, UserError):
                kind = FailureKind.USER_ERROR
            elif isinstance(cause, NonFiniteLoss):
                kind = FailureKind.NON_FINITE
                data = {"batch": cause.step, "value": cause.value}
            tb = f"--- rank {rank} traceback ---\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            msg = f"rank {rank} failed during {phase}: {type(cause).__name__}: {lines[-1] if lines else ''}"
            raise GroupFailed(Failure(kind, msg, rank=rank, node_id=self._node(rank), traceback=tb, data=data)) from None
        except ray.exceptions.RayActorError as e:
            rank = self._failed_rank(refs, ranks)
            node = self._node(rank)
            alive = node is None or node in cluster.node_ips()
            kind = FailureKind.DIED if alive else FailureKind.NODE_LOST
            what = "died (process killed or out of memory)" if alive else f"was lost with its node {node}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GroupFailed(Failure(kind, f"rank {rank} {what} during {phase}: {first}", rank=rank,
                                      node_id=node)) from None

    def _node(self, rank: int | None) -> str | None:
        return self.nodes[rank] if rank is not None and 0 <= rank < len(self.nodes) else None

    @staticmethod
    def _failed_rank(refs: list, ranks: list[int]) -> int | None:
        import ray

        for ref, rank in zip(refs, ranks, strict=True):
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
                return rank
            except ray.exceptions.GetTimeoutError:
                continue
        return None

    def _stop_group(self) -> None:
        """Kill the worker group and give back its resources; run-level actors stay."""
        import ray

        for w in self.h.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.h.workers = []
        if self.h.checkpoints is not None:
            for r in range(self.cfg.scaling.num_workers):
                self.h.checkpoints.release_rank.remote(r)  # slots of killed writers
        cluster.release(self.h.placement)  # a lost node's bundles cannot come back; reserve afresh
        self.h.placement = None
