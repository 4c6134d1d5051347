"""The controller's decisions as a pure function: `Machine.step(state, event, now) -> (state, actions)`.

    Reserving --Reserved--> Starting --Started--> Training --Finished--> Done
        |                      |                     |
    ReserveFailed          GroupFailed           GroupFailed --policy: RAISE--> Failed
        |                      +----------+----------+
        v                                 v policy: RESTART
      Failed                   Restarting --Tick (backoff over)--> Reserving (next attempt)

    any state --Interrupt--> Stopped
    any state --NodesChecked--> the same state, stall culprits whose node checks passed let back in

No Ray, no store, no clock of its own: the controller (controller.py) turns the world into events
and carries the actions out, so every transition is tested in microseconds (tests/test_control.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.policy import Decision, Failure, FailureKind, RestartPolicy

# --- what carries from one attempt to the next ------------------------------------------


@dataclass(frozen=True)
class Run:
    attempt: int
    restore: int | str | None = None  # None: step 0; "latest": the newest good checkpoint; N: a fork's step
    restarts: int = 0
    skipped: tuple[int, ...] = ()  # global batches left out after a non-finite loss (on_nonfinite=rollback)
    avoid_nodes: tuple[str, ...] = ()  # culprit nodes of earlier stalls and replaced stragglers
    on_probation: tuple[str, ...] = ()  # of those, nodes avoided for one stall only: passing checks lets them back
    let_back: tuple[str, ...] = ()  # nodes let back in once: a later stall there keeps them out for the run
    restore_at_most: int | None = None  # after corruption: only a checkpoint from before it
    failed_at: float | None = None  # when the failure the current group recovers from happened
    streak: int = 0  # counted failures since the last recovery: what the backoff grows with


# --- states -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserving:
    run: Run


@dataclass(frozen=True)
class Starting:
    run: Run
    world: int


@dataclass(frozen=True)
class Training:
    run: Run
    world: int


@dataclass(frozen=True)
class Restarting:
    run: Run  # already the next attempt's
    until: float  # backoff: reserve again from then on


@dataclass(frozen=True)
class Done:
    run: Run
    summary: dict


@dataclass(frozen=True)
class Failed:
    run: Run
    message: str
    failure: Failure | None = None  # None: the cluster could not give the resources
    error: Exception | None = None  # what to raise, when it is not a failed group


@dataclass(frozen=True)
class Stopped:
    run: Run
    reason: str


State = Reserving | Starting | Training | Restarting | Done | Failed | Stopped
TERMINAL = (Done, Failed, Stopped)

# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserved:
    world: int


@dataclass(frozen=True)
class ReserveFailed:
    error: Exception


@dataclass(frozen=True)
class Started:
    step0: int | None  # the step the group resumes at (None: from the start)


@dataclass(frozen=True)
class Recovered:
    step: int  # the group completed this step, the first since the failure


@dataclass(frozen=True)
class Finished:
    summary: dict


@dataclass(frozen=True)
class GroupFailed:
    failure: Failure


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class NodesChecked:
    passed: tuple[str, ...]  # a stall's suspect nodes whose checks found no problem (hang/rules.py passed_nodes)


@dataclass(frozen=True)
class Interrupt:
    reason: str = "interrupted by the user (Ctrl-C)"
    status: str = "interrupted"  # or "stopped" (`orchestrator stop`)


Event = Reserved | ReserveFailed | Started | Recovered | Finished | GroupFailed | Tick | Interrupt | NodesChecked

# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    attempt: int
    restore: int | str | None
    avoid_nodes: tuple[str, ...]


@dataclass(frozen=True)
class StartGroup:
    attempt: int
    world: int
    restore: int | str | None
    skipped: tuple[int, ...]
    recovering: bool  # a failure came before: report the recovery time
    restore_at_most: int | None = None


@dataclass(frozen=True)
class RetireCheckpoints:
    """Checkpoints written after `after` steps may hold corrupt state: no restart may use them."""

    after: int
    reason: str


@dataclass(frozen=True)
class StopGroup:
    pass


@dataclass(frozen=True)
class EndAttempt:
    attempt: int
    status: str  # completed | failed | resized | replaced | interrupted
    failure: Failure | None = None


@dataclass(frozen=True)
class FollowUpStall:
    """Node checks and the rest of the stall report, once the hung group is gone."""


@dataclass(frozen=True)
class RecordRecovery:
    attempt: int
    seconds: float


@dataclass(frozen=True)
class Say:
    text: str


Action = Reserve | StartGroup | StopGroup | EndAttempt | FollowUpStall | RecordRecovery | RetireCheckpoints | Say

ATTEMPT_STATUS = {FailureKind.RESIZE: "resized", FailureKind.STRAGGLER: "replaced"}


class Machine:
    def __init__(self, policy: RestartPolicy, *, avoid_culprit_node: bool = True):
        self.policy = policy
        self.avoid_culprit_node = avoid_culprit_node

    def start(self, run: Run) -> tuple[State, list[Action]]:
        return Reserving(run), [Reserve(run.attempt, run.restore, run.avoid_nodes)]

    def step(self, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
        if isinstance(state, TERMINAL):
            raise ValueError(f"{type(state).__name__} is final; got {type(event).__name__}")
        run = state.run
        if isinstance(event, Interrupt):
            stop = [StopGroup(), EndAttempt(run.attempt, event.status)] if isinstance(state, (Starting, Training)) else []
            return Stopped(run, event.reason), stop
        if isinstance(event, NodesChecked):
            return self._checked(state, event)
        if isinstance(state, Reserving):
            if isinstance(event, Reserved):
                recovering = run.failed_at is not None
                return Starting(run, event.world), [StartGroup(run.attempt, event.world, run.restore, run.skipped,
                                                               recovering, run.restore_at_most)]
            if isinstance(event, ReserveFailed):
                return Failed(run, str(event.error), error=event.error), []
        elif isinstance(state, (Starting, Training)):
            if isinstance(event, GroupFailed):
                return self._failed(state, event.failure, now)
            if isinstance(state, Starting) and isinstance(event, Started):
                return Training(run, state.world), []
            if isinstance(state, Training) and isinstance(event, Recovered):
                if run.failed_at is None:
                    return state, []
                seconds = now - run.failed_at
                # a failure after a recovery is a new one, not a crash loop: no backoff carried over
                return Training(replace(run, failed_at=None, streak=0), state.world), [
                    RecordRecovery(run.attempt, seconds),
                    Say(f"recovered: step {event.step + 1} done {seconds:.1f}s after the failure")]
            if isinstance(state, Training) and isinstance(event, Finished):
                return Done(run, event.summary), [EndAttempt(run.attempt, "completed")]
        elif isinstance(state, Restarting):
            if isinstance(event, Tick):
                if now < state.until:
                    return state, []
                return Reserving(run), [Reserve(run.attempt, run.restore, run.avoid_nodes)]
        raise ValueError(f"{type(event).__name__} is not expected in {type(state).__name__}")

    @staticmethod
    def _checked(state: State, event: NodesChecked) -> tuple[State, list[Action]]:
        """A stall's culprit node that passed its node checks is placed on again, once: with few
        nodes, avoiding every culprit for the rest of the run leaves restarts fewer and fewer
        places to go. A node avoided for anything else (a straggler, a GPU fault, corruption) or
        for a second stall stays out."""
        run = state.run
        back = [n for n in event.passed if n in run.on_probation]
        if not back:
            return state, []
        run = replace(run, avoid_nodes=tuple(n for n in run.avoid_nodes if n not in back),
                      on_probation=tuple(n for n in run.on_probation if n not in back),
                      let_back=tuple(sorted({*run.let_back, *back})))
        nodes = ", ".join(n[:12] for n in back)
        return replace(state, run=run), [Say(f"node {nodes} passed its checks after the stall: restarts may use it "
                                             "again (a second stall there keeps it out for the run)")]

    def _failed(self, state: Starting | Training, f: Failure, now: float) -> tuple[State, list[Action]]:
        run = state.run
        actions: list[Action] = [StopGroup(), EndAttempt(run.attempt, ATTEMPT_STATUS.get(f.kind, "failed"), f)]
        avoid, probation = set(run.avoid_nodes), set(run.on_probation)
        if f.kind is FailureKind.HANG:
            actions.append(FollowUpStall())
            if self.avoid_culprit_node:
                culprits = set(f.data.get("culprit_nodes", ()))
                again = culprits & (avoid | set(run.let_back))  # stalled before (checked or not) or avoided already
                probation = (probation - again) | (culprits - again)  # a first stall there: its checks may clear it
                avoid |= culprits
        if f.kind in (FailureKind.STRAGGLER, FailureKind.GPU) and f.node_id and f.data.get("avoid_node", True):
            avoid.add(f.node_id)
            probation.discard(f.node_id)
        at_most = None
        if f.kind is FailureKind.SDC:
            avoid |= set(f.data.get("suspect_nodes", ()))
            probation -= set(f.data.get("suspect_nodes", ()))
            at_most = f.data["last_good"]
            actions.append(RetireCheckpoints(at_most, f.message))
        decision = self.policy.decide(f, run.restarts)
        if decision is Decision.RAISE:
            why = ""
            if f.kind is not FailureKind.USER_ERROR and run.restarts:
                why = (f" (after {run.restarts} restart{'s' if run.restarts != 1 else ''}; "
                       f"fault_tolerance.max_restarts={self.policy.max_restarts})")
            return Failed(run, f.message + why, failure=f), actions
        skipped = run.skipped
        if f.kind is FailureKind.NON_FINITE and f.data.get("batch") is not None:
            skipped = (*skipped, f.data["batch"])
            actions.append(Say(f"skipping global batch {f.data['batch']} (non-finite loss) after the rollback"))
        restarts, streak, delay = run.restarts, run.streak, 0.0
        if self.policy.counts(f):
            delay = self.policy.delay_s(streak)
            restarts, streak = restarts + 1, streak + 1
        if f.kind is FailureKind.RESIZE:
            actions.append(Say(f"RESIZE: {f.message}"))
        else:
            actions.append(Say(f"RESTART {restarts}/{self.policy.max_restarts}: {f.message}; "
                               f"restoring the latest checkpoint in {delay:.1f}s"))
        nxt = Run(attempt=run.attempt + 1, restore="latest", restarts=restarts, skipped=skipped,
                  avoid_nodes=tuple(sorted(avoid)), on_probation=tuple(sorted(probation)), let_back=run.let_back,
                  failed_at=now, restore_at_most=at_most, streak=streak)
        return Restarting(nxt, until=now + delay), actions
