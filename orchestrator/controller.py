"""The control loop of one run: it turns what the worker group does into events for the state
machine (control.py) and carries out the actions it returns.

The worker group (worker_group.py: every Ray call), the store, the output and the clock come in
from outside, so tests drive this loop with a fake group and a fake clock (tests/test_controller.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from common.errors import ResourceError, UserError
from common.labels import node_labels
from orchestrator import snapshots
from orchestrator.config import Config
from orchestrator.control import (
    TERMINAL,
    Done,
    EndAttempt,
    Failed,
    Finished,
    FollowUpStall,
    GroupFailed,
    Interrupt,
    Machine,
    NodesChecked,
    RecordRecovery,
    Recovered,
    Reserve,
    Reserved,
    ReserveFailed,
    Restarting,
    RetireCheckpoints,
    Run,
    Say,
    Started,
    StartGroup,
    State,
    StopGroup,
    Stopped,
    Tick,
    Training,
)
from orchestrator.hang import xid
from orchestrator.hang.rules import passed_nodes
from orchestrator.hang.watchdog import Watchdog
from orchestrator.policy import (
    ElasticPolicy,
    Failure,
    FailureKind,
    GroupError,
    RestartPolicy,
    StragglerPolicy,
)
from orchestrator.progress import Progress
from orchestrator.store import Store

STOPPED = "stopped by `orchestrator stop`"
KEEP_PLACEMENT = (FailureKind.DIED, FailureKind.EXCEPTION, FailureKind.NON_FINITE, FailureKind.NCCL)


def keeps_placement(f: Failure) -> bool:
    """A rank that Ray saw die, or that raised, leaves its node fit to hold the next group: the
    placement group stays. A hang's, a lost node's or a GPU's does not, nor a death only inferred
    from lost connections (its node may be gone without Ray having said so yet)."""
    return f.kind in KEEP_PLACEMENT and not f.data.get("peer_lost") and not f.data.get("unconfirmed")


class RunFailed(UserError):
    """The run cannot go on; the message names the rank, the worker's traceback is kept."""

    exit_code = 1


class WorkerTraceback(Exception):
    """Carries a worker's traceback text as the cause of a RunFailed, shown once by the CLI."""


class Controller:
    def __init__(self, cfg: Config, run_id: str, store: Store, group, out, *, first_attempt: int = 0,
                 restore: int | str | None = None, source_uri: str | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 stop_requested: Callable[[], bool] = lambda: False):
        """restore: None (fresh start), "latest" (resume), or a step (a fork: that checkpoint of the
        parent's, at `source_uri`, until this run has committed one of its own)."""
        self.cfg, self.run_id, self.store, self.group, self.out = cfg, run_id, store, group, out
        self.clock, self.sleep, self.stop_requested = clock, sleep, stop_requested
        self.first = Run(attempt=first_attempt, restore=restore)
        self.source = (source_uri, restore) if source_uri is not None else None
        ft, s, hang = cfg.fault_tolerance, cfg.scaling, cfg.hang
        self.policy = RestartPolicy(max_restarts=ft.max_restarts, backoff_s=ft.backoff_s, on_nonfinite=ft.on_nonfinite)
        self.machine = Machine(self.policy, avoid_culprit_node=hang.avoid_culprit_node)
        self.elastic = ElasticPolicy(num_workers=s.num_workers, min_workers=s.min_workers,
                                     global_batch=cfg.data.global_batch_size if cfg.entrypoint.kind == "builtin" else None,
                                     cpus=s.cpus_per_worker,
                                     gpus=s.gpus_per_worker, clock=clock)
        self.stragglers = StragglerPolicy(hang.straggler_action, clock=clock)
        self.watchdog = Watchdog.from_config(hang, clock=clock, reader=group.read_processes)
        self.last_step = -1  # last step every rank completed, as the metrics actor saw it
        self.max_step = -1  # last step any rank completed: what a failure loses is counted from here
        self.step0: int | None = None  # where the current group started
        self.world = self.attempt = 0
        self.acting_on: tuple[int, dict] | None = None  # (event id, data) of the stall or straggler acted on
        self.progress: Progress | None = None
        self.stopping_since: float | None = None  # when the ranks were asked to stop (`orchestrator stop`)
        self.checks_due: list[tuple[int, dict]] = []  # stalls' node checks, to start once the next group recovered
        self.checks: tuple[int, dict, Future] | None = None  # the checks running (one set at a time)
        self.may_check = True  # the group after the last stall has recovered: checks may run beside it
        self._check_pool: ThreadPoolExecutor | None = None
        self.next_state: State | None = None  # the state the actions being carried out lead to
        self.failure: Failure | None = None  # the failure those actions answer, if any

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        t0 = self.clock()
        state, actions = self.machine.start(self.first)
        while True:
            try:
                self.next_state = state
                event = self._carry_out(actions)
                if isinstance(state, TERMINAL):
                    self._collect_checks(wait=True)
                    return self._finish(state, t0)
                event = event or self._next_event(state)
            except KeyboardInterrupt:
                if isinstance(state, TERMINAL):
                    raise
                event = Interrupt()
            self.failure = event.failure if isinstance(event, GroupFailed) else None
            state, actions = self.machine.step(state, event, self.clock())

    def _finish(self, state: State, t0: float) -> dict:
        if isinstance(state, Done):
            return {**state.summary, "wall_time_s": self.clock() - t0, "restarts": state.run.restarts}
        if isinstance(state, Stopped):
            raise KeyboardInterrupt
        assert isinstance(state, Failed)
        if state.error is not None:
            raise state.error
        f = state.failure
        raise RunFailed(state.message) from (WorkerTraceback(f.traceback) if f and f.traceback else None)

    def _next_event(self, state: State):
        if isinstance(state, Restarting):
            self.sleep(max(0.0, state.until - self.clock()))
            return Interrupt(STOPPED, "stopped") if self.stop_requested() else Tick()
        if isinstance(state, Training):
            return self._watch(state)
        raise RuntimeError(f"no event source in state {type(state).__name__}")

    def _carry_out(self, actions: list) -> object | None:
        """Carry out the actions in order; the first event one of them produced, if any."""
        event = None
        for a in actions:
            got = self._do(a)
            event = event or got
        return event

    def _do(self, a):
        if isinstance(a, Say):
            self.out(a.text)
        elif isinstance(a, Reserve):
            return self._reserve(a)
        elif isinstance(a, StartGroup):
            return self._start(a)
        elif isinstance(a, StopGroup):
            self._stop()
        elif isinstance(a, EndAttempt):
            self._end_attempt(a)
        elif isinstance(a, FollowUpStall):
            self._follow_up_stall()
        elif isinstance(a, RecordRecovery):
            self.store.set_recovery(self.run_id, a.attempt, a.seconds)
            self.may_check = True
            self._start_checks()
        elif isinstance(a, RetireCheckpoints):
            retired = self.group.retire_checkpoints(a.after, a.reason)
            if retired:
                self.out(f"checkpoints of step(s) {', '.join(map(str, retired))} retired: written after the last "
                         f"good replica check (step {a.after})")
        else:
            raise TypeError(f"unknown action {a!r}")
        return None

    # --- actions ------------------------------------------------------------------------

    def _reserve(self, a: Reserve):
        try:
            world, note = self.group.reserve(self.elastic.sizes(), a.avoid_nodes)
        except ResourceError as e:
            return ReserveFailed(e)
        if note:
            self._placed(note)
        prometheus = self.group.start_run_actors()
        if prometheus:
            self.out(f"Prometheus metrics: http://{prometheus}/metrics")
        return Reserved(world)

    def _start(self, a: StartGroup):
        source_uri, durable = self._restore_from(a.restore, at_most=a.restore_at_most)
        snapshot = self._snapshot(a, durable) if source_uri is None and a.recovering else None
        step0 = snapshot.step if snapshot is not None else durable
        self.store.start_attempt(self.run_id, a.attempt, resumed_from_step=step0)
        self.group.set_attempt(a.attempt)
        self.acting_on, self.attempt = None, a.attempt
        self.last_step = self.max_step = -1
        self.step0, self.world = step0, a.world
        self.stragglers.new_group()
        try:
            info = self.group.start(a.attempt)
        except GroupError as g:
            return GroupFailed(g.failure)
        self.store.update_meta(self.run_id, workers=info["workers"])
        resumed = f", resuming at step {step0}" if step0 is not None else ""
        resumed += " from in-memory snapshots" if snapshot is not None else ""
        if info.get("standby_boosted"):  # spares taken before their warm-up ended, at a rank's priority now
            resumed += (f"; {info['standby_used']} of them standby workers, {info['standby_boosted']} still "
                        "warming up (finishing at full priority)")
        elif info.get("standby_used"):
            resumed += f"; {info['standby_used']} of them warm standby workers"
        elif a.recovering and self.cfg.fault_tolerance.standby_workers and not info.get("in_place"):
            # spares start after a group's first step: a fault before that meets none
            resumed += "; no standby worker was there yet (they start once a group trains): started cold"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in info.get("stages", {}).items())
        self.out(f"rendezvous done: {info['world']} ranks on {info['nodes']} node(s), backend {info['backend']}, "
                 f"master {info['master']} ({info['seconds']:.1f}s{': ' + stages if stages else ''}){resumed}")
        # the durable step stays the ranks' fallback, should a snapshot be unreadable after all
        self.group.train(durable, source_uri, a.skipped, **({"snapshot": snapshot} if snapshot else {}))
        self.watchdog.reset()
        self.progress = Progress(self.cfg.train.max_steps, self.cfg.telemetry.progress_every_s, self.out)
        return Started(step0)

    def _stop(self) -> None:
        """A script run restarting after its scripts failed (a crash, an exit, a SIGKILL of the
        script) keeps its workers and placement group and starts new script processes in them;
        anything else (a dead worker, a lost node, a hang, a GPU fault, a resize) replaces the
        group. The attempt, its logs, the restart count and backoff are the same either way."""
        f = self.failure
        restarting = f is not None and isinstance(self.next_state, Restarting)
        if not (restarting and f.data.get("script_exit") and f.kind in (FailureKind.EXCEPTION, FailureKind.NCCL)):
            self.group.stop(keep_placement=restarting and keeps_placement(f))
        elif self.group.stop(in_place=True):
            self.out("restarting in place: the ranks' workers stay, their scripts start anew")
        else:
            self.out("restart in place not possible (a worker did not answer): replacing the group")

    def _end_attempt(self, a: EndAttempt) -> None:
        f = a.failure
        if f is None:
            self.store.end_attempt(self.run_id, a.attempt, a.status)
            return
        p = self.group.progress()  # one more look at the ranks' progress (no waiting: a restart is urgent)
        if p is not None:
            self.last_step = max(self.last_step, p.get("step", -1))
            self.max_step = max(self.max_step, p.get("max_step", -1))
        resume_at = self._latest()  # where a restart would pick up
        if self.cfg.checkpoint.memory_every_steps and self.world:
            # a node lost, or one Ray cannot reach: its keeper is not asked (each call takes ~2 s to fail)
            gone = (f.node_id,) if f.node_id and (f.kind is FailureKind.NODE_LOST or f.data.get("unreachable")) else ()
            newest = snapshots.choose(self.group.snapshot_inventory(unreachable=gone), world_size=self.world,
                                      durable_step=resume_at)
            resume_at = newest.step if newest.step is not None else resume_at
        lost = max(0, self.max_step + 1 - (resume_at or 0))
        self.store.end_attempt(self.run_id, a.attempt, a.status, cause=f.kind.value, message=f.message, rank=f.rank,
                               node=f.node_id, failed_step=self.max_step, steps_lost=lost)
        kind = {FailureKind.RESIZE: "resize", FailureKind.STRAGGLER: "straggler_replaced"}.get(
            f.kind, f"failure_{f.kind.value}")
        data = {"attempt": a.attempt, **{k: v for k, v in f.data.items() if k != "event"}}
        if f.kind is FailureKind.SDC:  # an alert: the store, the console and the webhook
            self.group.alert("sdc", "error", f.message, step=f.data.get("step"), rank=f.rank, data=data)
            return
        self.store.add_event(self.run_id, kind=kind, severity="info" if f.planned else "error", message=f.message,
                             step=self.last_step, rank=f.rank, data=data)

    def _follow_up_stall(self) -> None:
        """Once the hung group is gone: check the suspect nodes and complete the stored report. The
        checks (seconds of matmuls and probes) decide nothing about the restart, which already
        avoids the culprit's node, so they start once the next group has recovered (or the run
        ends): beside its restore, on a node it shares, they slowed it (a frozen rank's restore
        3.4 s against 0.5 s after a kill, bench/goodput.py on 2 cores)."""
        if self.acting_on is None:
            return
        event_id, report = self.acting_on
        self.store.update_event_data(event_id, report)
        if not self.cfg.hang.node_checks:
            return
        # after an earlier stall's, which may still run: this restart does not wait for them (up to
        # hang.node_check_timeout_s; two stalls 35 s apart made the second restart wait 3.8-5.4 s)
        self.checks_due.append((event_id, report))
        self.may_check = False

    def _start_checks(self, *, run_ended: bool = False) -> None:
        """The next stall's checks, once no other checks run and the group after the last stall
        has recovered (or the run has ended)."""
        if self.checks is not None or not self.checks_due or not (self.may_check or run_ended):
            return
        event_id, report = self.checks_due.pop(0)
        self._check_pool = self._check_pool or ThreadPoolExecutor(1, thread_name_prefix="node-checks")
        self.checks = (event_id, report, self._check_pool.submit(self.group.check_suspects, dict(report)))

    def _collect_checks(self, *, wait: bool) -> tuple[str, ...]:
        """Store node checks into their stall's report once they are done, and start the next due;
        with `wait` (the run ended), every due set, one after another, each bounded by
        hang.node_check_timeout_s. Returns the suspect nodes whose checks collected now passed."""
        passed: tuple[str, ...] = ()
        while True:
            if wait:
                self._start_checks(run_ended=True)
            if self.checks is None or not (wait or self.checks[2].done()):
                return passed
            event_id, report, future = self.checks
            self.checks = None
            try:
                report["node_checks"] = future.result(timeout=self.cfg.hang.node_check_timeout_s + 60)
            except Exception as e:  # a report without checks, never a driver that dies of them
                report["node_checks"] = {"error": f"{type(e).__name__}: {e}"}
            self.store.update_event_data(event_id, report)
            passed += tuple(passed_nodes(report["node_checks"]))
            if not wait:
                self._start_checks()
                return passed

    def _placed(self, note: str) -> None:
        self.out(note)
        if self.acting_on is not None:  # the stall or straggler that asked for it: its event says what was done
            event_id, data = self.acting_on
            data["placement"] = note
            self.store.update_event_data(event_id, data)

    def _restore_from(self, restore: int | str | None, *, at_most: int | None = None) -> tuple[str | None, int | None]:
        """(checkpoint location, step) the next group starts from; (None, None) is step 0."""
        if restore is None:
            return None, None
        uri, committed = self.group.committed_steps()
        if at_most is not None:
            committed = [s for s in committed if s <= at_most]
        if restore == "latest" and committed:
            return None, committed[-1]  # None: the run's own location, which the workers know
        if self.source is not None:  # a fork with no checkpoint of its own yet
            return self.source
        if restore == "latest":
            return None, None  # nothing committed yet: start over from step 0
        raise UserError(f"no committed checkpoint at step {restore} in {uri} "
                        f"(steps with one: {', '.join(map(str, committed)) or 'none'})")

    def _snapshot(self, a: StartGroup, durable: int | None) -> snapshots.Choice | None:
        """After a failure, with checkpoint.memory_every_steps: the in-memory snapshots to restore,
        if every rank has one of a step not older than the durable checkpoint (snapshots.choose)."""
        if not self.cfg.checkpoint.memory_every_steps or a.restore != "latest":
            return None
        choice = snapshots.choose(self.group.snapshot_inventory(), world_size=a.world, durable_step=durable,
                                  at_most=a.restore_at_most)
        if choice.step is None:
            where = f"step {durable}" if durable is not None else "none yet: from step 0"
            msg = f"in-memory snapshots not used: {choice.why}; restoring the durable checkpoint ({where})"
            self.out(f"SNAPSHOT {msg}")
            self.store.add_event(self.run_id, kind="snapshot_fallback", severity="warning", message=msg, step=durable,
                                 data={"why": choice.why, "durable_step": durable, "attempt": a.attempt})
            return None
        nodes = sorted({n for held in choice.holders.values() for n in held})
        msg = (f"restoring step {choice.step} from in-memory snapshots on node(s) {node_labels(nodes)} "
               f"(newest durable checkpoint: {'step ' + str(durable) if durable is not None else 'none'})")
        self.out(f"SNAPSHOT {msg}")
        self.store.add_event(self.run_id, kind="snapshot_restore", severity="info", message=msg, step=choice.step,
                             data={"step": choice.step, "nodes": nodes, "durable_step": durable, "attempt": a.attempt,
                                   "holders": {str(r): list(n) for r, n in choice.holders.items()}})
        return choice

    def _latest(self) -> int | None:
        committed = self.group.committed_steps()[1]
        return committed[-1] if committed else None

    # --- watching a training group ------------------------------------------------------

    def _watch(self, state: Training):
        """Until the group finishes or fails, or (after a failure) completes its first step."""
        # the group's wait returns at once when a rank finishes or fails, so failures are seen
        # immediately; the timeout only paces the progress poll, which costs the ranks CPU. Between
        # polls the watchdog looks at the heartbeats alone: when a rank's beat turns late, then
        # every 0.25 s while its process is read (hang/procstate.py), so a frozen rank is named in seconds
        tick = min(self.cfg.telemetry.progress_every_s, 2.0)
        p, polled_at = None, 0.0
        while True:
            try:
                summaries = self.group.wait(tick if p is None else min(tick, self.watchdog.next_look_s(tick)))
            except GroupError as g:
                if self.stopping_since is not None:  # asked to stop: no restart
                    self.out(f"stopping: {g.failure.message}; no final checkpoint")
                    return Interrupt(STOPPED, "stopped")
                return GroupFailed(self._after_xid(g.failure))
            if summaries is not None:
                if any(s.get("stopped") for s in summaries):
                    at = summaries[0].get("stopped_at")
                    self.out(f"stopped after step {at}, its checkpoint committed" if at is not None else
                             "stopped: the ranks ended on request")
                    return Interrupt(STOPPED, "stopped")
                return Finished(self._summary(summaries))
            if self.stop_requested():
                stop = self._stop_group()
                if stop is not None:
                    return stop
            passed = self._collect_checks(wait=False)
            if passed:  # a stall's culprit may be let back in (the machine decides)
                return NodesChecked(passed)
            if p is not None and self.clock() - polled_at < 0.9 * tick:  # a look between polls
                stall = self._watchdog(p)
                if stall is not None:
                    return stall
                continue
            polled = self.group.poll()
            if polled is None:
                continue
            polled_at, p = self.clock(), polled["progress"]
            self.last_step = max(self.last_step, p.get("step", -1))
            self.max_step = max(self.max_step, p.get("max_step", -1))
            for line in polled.get("lines", ()):
                self.out(f"[rank 0] {line}")
            for alert in polled["alerts"]:
                self._show_alert(alert, state)
            gpu = self._xid_failure(polled["alerts"])
            if gpu is not None:
                return GroupFailed(gpu)
            if state.run.failed_at is not None and self.last_step >= (self.step0 or 0):
                return Recovered(self.last_step)
            if self.progress.due():
                self.progress.show(p)
            event = self._check(p)
            if event is not None:
                return event

    def _stop_group(self) -> Interrupt | None:
        """`orchestrator stop`: ask the ranks to end at an agreed step with a final checkpoint
        (orchestrator/stopping.py); kill them if they have not within fault_tolerance.stop_timeout_s."""
        limit = self.cfg.fault_tolerance.stop_timeout_s
        if self.stopping_since is None:
            self.stopping_since = self.clock()
            self.group.request_stop()
            self.out(f"stop requested: the ranks save a final checkpoint at their next step boundary "
                     f"(up to {limit:.0f}s, fault_tolerance.stop_timeout_s)")
        elif self.clock() - self.stopping_since > limit:
            self.out(f"stopping: the ranks did not end within {limit:.0f}s; stopped without a final checkpoint")
            return Interrupt(STOPPED, "stopped")
        return None

    def _check(self, progress: dict):
        """The watchdog, then the planned restarts (regrow, straggler replacement)."""
        stall = self._watchdog(progress)
        if stall is not None:
            return stall
        note, resize = self.elastic.check(self.world, self.group.free_resources, self._latest)
        if note:
            self.out(note)
        if resize is not None:
            return GroupFailed(resize)
        replace = self.stragglers.check(self._latest)
        if replace is not None:
            self.acting_on = replace.data["event"]
            return GroupFailed(replace)
        return None

    def _show_alert(self, alert: dict, state: Training) -> None:
        self.out(f"ALERT {alert['severity']} {alert['kind']}: {alert['message']}")
        if alert["kind"] == "straggler":
            note = self.stragglers.on_alert(alert, self.group.node(alert["rank"]),
                                            budget_left=self.policy.may_replace_straggler(state.run.restarts),
                                            latest=self._latest(), max_restarts=self.policy.max_restarts)
            if note:
                self.out(note)

    def _xid_failure(self, alerts: list[dict], then: Failure | None = None) -> Failure | None:
        """A GPU Xid that asks for a restart (hang/xid.py): the group's failure, on that GPU's node."""
        for alert in alerts:
            what = xid.action(alert)
            if what is None:
                continue
            d = alert["data"]
            msg = alert["message"] + (f"; then {then.message}" if then is not None else "")
            return Failure(FailureKind.GPU, msg, rank=alert.get("rank"), node_id=d.get("node"),
                           traceback=then.traceback if then is not None else None,
                           data={"xid": d.get("xid"), "meaning": d.get("meaning"), "gpu": d.get("gpu"),
                                 "avoid_node": what == "fatal"})
        return None

    def _after_xid(self, f: Failure) -> Failure:
        """A group that failed just after a GPU Xid failed of it, however the ranks saw it (often as
        a vague NCCL error on another node): name the Xid, its GPU and node instead."""
        if f.kind in (FailureKind.USER_ERROR, FailureKind.SDC, FailureKind.NON_FINITE) or not self.cfg.scaling.gpus_per_worker:
            return f
        try:
            alerts = self.group.take_alerts()
        except Exception:  # the metrics actor is gone too
            return f
        for alert in alerts:
            self.out(f"ALERT {alert['severity']} {alert['kind']}: {alert['message']}")
        return self._xid_failure(alerts, then=f) or f

    def _watchdog(self, progress: dict):
        """A stall: the report naming the culprit is stored, the Flight Recorder collected, the group failed."""
        beats = self.group.heartbeats()
        if beats is None:
            return None
        report = self.watchdog.check(beats, median_step_s=progress.get("median_step_time_s"), world=self.world,
                                     nodes=self.group.nodes, finished=self.group.finished_ranks())
        if report is None:
            return None
        culprit = report["culprits"][0] if report["culprits"] else None
        msg = report.pop("message")
        self.out(f"STALL {msg}")
        step = report["step"]
        event_id = self.store.add_event(self.run_id, kind="stall", severity="error", message=msg, step=step,
                                        rank=culprit, data=report)
        self.acting_on = (event_id, report)
        if self.cfg.hang.flight_recorder_entries:
            folder = self.store.root / "diagnostics" / self.run_id / f"attempt{self.attempt}-step{step}"
            report["flight_recorder"] = fr = self.group.flight_recorder(report, folder)
            self.out(f"  flight recorder: {fr['summary']}")
            self.store.update_event_data(event_id, report)
        return GroupFailed(Failure(FailureKind.HANG, msg, rank=culprit, node_id=self.group.node(culprit),
                                   data={k: report[k] for k in ("verdict", "culprits", "culprit_nodes")}))

    def _summary(self, summaries: list[dict]) -> dict:
        for alert in self.group.take_alerts():
            self.out(f"ALERT {alert['severity']} {alert['kind']}: {alert['message']}")
        final = self.group.progress()
        if final is not None:
            self.progress.show(final, final=True)
        summary = dict(summaries[0])
        summary["step_time_s_median"] = statistics.median([x["train_time_s"] / max(1, x["steps"]) for x in summaries])
        return summary
