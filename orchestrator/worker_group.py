"""Every Ray call the controller makes, in one adapter: the run's actors (metrics, checkpoint
coordinator, health monitor), the placement group, the worker actors of one attempt, and what
the controller asks of them. Tests replace it with a fake (tests/test_controller.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors import checkpoint_coordinator
from actors.health import HealthMonitor
from actors.metrics_actor import MetricsActor
from actors.node_relay import Relays, relay_nodes
from actors.snapshot_keeper import Keepers
from actors.train_worker import TrainWorker
from checkpointing.layout import scan
from checkpointing.storage import open_fs
from common.errors import ResourceError, UserCodeError, UserError
from orchestrator import (
    cluster,
    entrypoints,
    peer_loss,
    priority,
    rank,
    rendezvous,
    script,
    stopping,
    visibility,
)
from orchestrator.anomaly import AnomalyDetector
from orchestrator.config import Config
from orchestrator.failures import describe
from orchestrator.hang import procstate, xid
from orchestrator.hang.followup import check_suspects, collect_flight_recorder
from orchestrator.hang.health import serve_dump_now
from orchestrator.policy import Failure, FailureKind, GroupError
from orchestrator.standby import Standby
from orchestrator.store import open_checkpoint_records, open_store

AVOID_WAIT_S = 10.0  # how long to look for room away from a culprit node before using it again
STOP_WAIT_S = 15.0  # how long a stopped group's ranks get to be gone
SCRIPT_TERM_S = 30.0  # restart in place: a script's time to end after SIGTERM before SIGKILL (torchrun's too)
# how long a rank's "lost a peer" error waits for Ray to say which rank or node is gone: Ray 2.60
# declares a crashed node dead after ~15 s of failed health checks (docs/MULTINODE.md), later on a busy machine
PEER_LOSS_WAIT_S = 45.0
CONTROL = "control"  # the worker's second concurrency group: requests that must not wait for the training call


@dataclass
class Handles:
    placement: cluster.Placement | None = None
    metrics: object = None
    checkpoints: object = None
    health: object = None
    workers: list = field(default_factory=list)
    keepers: Keepers | None = None  # in-memory snapshots' keepers, one per node (checkpoint.memory_every_steps)
    relays: Relays | None = None  # the group's per-node relays of heartbeats and metrics (telemetry.relay)


class WorkerGroup:
    def __init__(self, cfg: Config, run_id: str, store_root: Path, out, *, store_uri: str | None = None):
        """store_root: this machine's folder for the run's files (the default checkpoint folder);
        store_uri: the tracking store (a SQLite file or postgresql://), default the one in store_root."""
        self.cfg, self.run_id, self.store_root, self.out = cfg, run_id, Path(store_root), out
        self.store_uri = store_uri or str(self.store_root)
        self.h = Handles()
        self.nodes: list[str] = []  # node id of each rank of the current group
        self.ips: list[str] = []  # and its node's address
        self.refs: list = []  # the ranks' train() results
        self.pending: list = []
        self.kept = False  # the last stop kept the workers (a restart in place): the next start reuses them
        self.infos: list[dict] = []  # node_info of each rank's worker
        self.standby: Standby | None = None  # warm spare workers (fault_tolerance.standby_workers)
        self.fill_after: int | None = None  # the step after which this group's spares are started
        if cfg.fault_tolerance.standby_workers:
            if cfg.scaling.gpus_per_worker > 0:
                out("fault_tolerance.standby_workers: not for GPU ranks (Ray hides GPUs from a spare); "
                    "restarts start new workers")
            else:
                config = cfg.to_dict()  # once, not per spare
                self.standby = Standby(
                    f"{cfg.run.name}:{run_id}", self._new_spare,
                    warm=lambda w: w.execute.remote(rank.with_config, rank.warm, config),
                    boost=lambda w: w.execute.options(concurrency_group=CONTROL).remote(priority.normal_priority))

    # --- the run's actors (once per run) ----------------------------------------------------

    def start_run_actors(self) -> str | None:
        """The metrics actor, the checkpoint coordinator and the health monitor, on the driver's
        node next to the store file, for every attempt. Returns the Prometheus address, if any."""
        if self.h.metrics is not None:
            return None
        cfg, run_id = self.cfg, self.run_id
        here = ray.get_runtime_context().get_node_id()
        t = cfg.telemetry
        self.h.metrics = ray.remote(MetricsActor).options(
            name=f"{cfg.run.name}:{run_id}:metrics", num_cpus=0, max_restarts=-1,  # senders replay into the restarted actor
            max_concurrency=checkpoint_coordinator.max_calls(cfg.scaling.num_workers),  # a batch waiting from every rank
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(run_id, self.store_uri, open_store=open_store, detector=AnomalyDetector(),
                 prometheus_host=t.prometheus_host, prometheus_port=t.prometheus_port, alert_webhook=t.alert_webhook)
        try:
            prometheus = ray.get(self.h.metrics.prometheus_address.remote())
        except ray.exceptions.RayActorError as e:
            raise UserError(f"telemetry.prometheus_port={t.prometheus_port}: cannot serve metrics on "
                            f"{t.prometheus_host}: {str(e).strip().splitlines()[-1]}") from None
        self.h.checkpoints = checkpoint_coordinator.start(cfg, run_id, str(self.store_root), here,
                                                          open_records=partial(open_checkpoint_records, self.store_uri))
        if cfg.hang.enabled:
            self.h.health = ray.remote(HealthMonitor).options(
                name=f"{cfg.run.name}:{run_id}:health", num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            ).remote()
        return prometheus

    def set_attempt(self, attempt: int) -> None:
        ray.get(self.h.metrics.set_attempt.remote(attempt))

    def committed_steps(self) -> tuple[str, list[int]]:
        """(the run's checkpoint location, its committed steps, oldest first)."""
        uri = ray.get(self.h.checkpoints.info.remote())["uri"]
        fs, root = open_fs(uri, self.cfg.checkpoint.storage_options)
        return uri, scan(fs, root).committed

    # --- reservations -----------------------------------------------------------------------

    def reserve(self, sizes: list[int], avoid_nodes: tuple[str, ...]) -> tuple[int, str | None]:
        """A placement group for the largest of `sizes` that fits within scaling.start_timeout_s.
        Returns (workers, a note on where it went when nodes were to be avoided)."""
        kept = self.h.placement
        if kept is not None and (self.kept or self._still_fits(kept, sizes[0], avoid_nodes)):
            return len(kept.bundle_nodes), None
        if kept is not None:
            cluster.release(kept)
            self.h.placement = None
        timeout = self.cfg.scaling.start_timeout_s
        if len(sizes) == 1:
            return sizes[0], self._reserve_group(sizes[0], timeout, avoid_nodes)
        deadline = time.monotonic() + timeout
        while True:
            for n in sizes:
                try:
                    note = self._reserve_group(n, 2.0, avoid_nodes)
                except ResourceError as e:
                    last_error = e
                    continue
                if n < sizes[0]:
                    batch = self.cfg.data.global_batch_size
                    same = (f" (global batch {batch} stays, {batch // n} per rank)"
                            if self.cfg.entrypoint.kind == "builtin" else "")
                    self.out(f"elastic: {n} of {sizes[0]} workers fit now; going on with {n}{same}")
                return n, note
            if time.monotonic() >= deadline:
                raise ResourceError(f"{last_error} (elastic: tried {', '.join(map(str, sizes))} workers)")

    @staticmethod
    def _still_fits(placement, n: int, avoid_nodes: tuple[str, ...]) -> bool:
        """A placement group kept across a restart serves the next group if it has the size
        wanted and none of its bundles is on a node to avoid or a node that is gone."""
        nodes = set(placement.bundle_nodes)
        return len(placement.bundle_nodes) == n and nodes <= cluster.node_ips().keys() and not nodes & set(avoid_nodes)

    def _reserve_group(self, n: int, timeout_s: float, avoid_nodes: tuple[str, ...]) -> str | None:
        """After a stall with a culprit node, first try without that node (hang.avoid_culprit_node),
        falling back to it when the cluster has no room elsewhere."""
        s = self.cfg.scaling
        kw = dict(run_id=self.run_id, num_workers=n, cpus=s.cpus_per_worker, gpus=s.gpus_per_worker)
        if not avoid_nodes:
            self.h.placement = cluster.reserve(**kw, timeout_s=timeout_s)
            return None
        names = cluster.node_labels(avoid_nodes)
        if cluster.room_elsewhere(cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker), list(avoid_nodes), n):
            try:
                self.h.placement = cluster.reserve(**kw, timeout_s=min(timeout_s, AVOID_WAIT_S),
                                                   avoid_nodes=list(avoid_nodes))
                return f"restarted without node {names}"
            except ResourceError:
                pass
        # else the other nodes could never hold the group: waiting AVOID_WAIT_S is futile
        self.h.placement = cluster.reserve(**kw, timeout_s=timeout_s)
        return f"no spare capacity outside node {names}: restarted on it"

    def retire_checkpoints(self, after: int, reason: str) -> list[int]:
        return ray.get(self.h.checkpoints.retire_after.remote(after, reason), timeout=120)

    def alert(self, kind: str, severity: str, message: str, **kw) -> None:
        ray.get(self.h.metrics.alert.remote(kind, severity, message, **kw), timeout=60)

    def free_resources(self) -> dict:
        return ray.available_resources()

    # --- one attempt ------------------------------------------------------------------------

    def start(self, attempt: int) -> dict:
        """Worker actors on the reserved bundles, rendezvous. Returns what the controller reports."""
        t0 = time.time()
        self.attempt = attempt
        cfg, h = self.cfg, self.h
        world = len(h.placement.bundle_nodes)
        ranks = rendezvous.assign_ranks(h.placement.bundle_nodes)
        by_rank = sorted(range(world), key=lambda b: ranks[b]["rank"])
        s = cfg.scaling
        in_place, self.kept = self.kept, False
        if not in_place:
            spares = self.standby.take([ranks[b]["node_id"] for b in by_rank]) if self.standby else [None] * world
            h.workers = [
                spare or _worker_actor().options(
                    name=f"{cfg.run.name}:{self.run_id}:rank{ranks[b]['rank']}" + (f":a{attempt}" if attempt else ""),
                    num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(h.placement.pg, placement_group_bundle_index=b),
                ).remote()
                for b, spare in zip(by_rank, spares, strict=True)
            ]
            used = sum(w is not None for w in spares)
            boosted = self.standby.boosted if self.standby else 0
        else:
            used = boosted = 0
        self.nodes = [ranks[b]["node_id"] for b in by_rank]
        if cfg.checkpoint.memory_every_steps:  # a keeper new to a node (a rank moved) starts beside the rendezvous
            self._keepers().ensure(self.nodes, attempt)
        config, is_script = cfg.to_dict(), cfg.entrypoint.kind == "script"  # a script joins the group itself
        # first: the warm script processes' imports overlap the rest of the start
        prepared = [w.execute.remote(rank.with_config, script.prepare, config) for w in h.workers] if is_script else []
        self._start_relays(attempt)
        infos = self.infos = self._gather([w.node_info.remote() for w in h.workers], "start")
        self.ips = [i["ip"] for i in infos]
        master_addr = infos[0]["ip"]
        master_port = self._gather([h.workers[0].execute.remote(rendezvous.free_port)], "start")[0]
        stages = {"workers": time.time() - t0}  # where a slow start went, in the controller's line
        if not in_place:  # the same workers saw the storage a moment ago
            self._check_storage(infos)
            stages["storage check"] = time.time() - t0 - sum(stages.values())
        joins = [
            w.execute.remote(rank.with_config, rendezvous.join, config, rank=ranks[b]["rank"],
                             local_rank=ranks[b]["local_rank"], world_size=world,
                             local_world_size=ranks[b]["local_world_size"], node_rank=ranks[b]["node_rank"],
                             master_addr=master_addr, master_port=master_port, run_id=self.run_id, attempt=attempt,
                             init_group=not is_script, node_ip=info["ip"], agent_store=is_script)
            for w, b, info in zip(h.workers, by_rank, infos, strict=True)
        ]
        # a script run: rank 0's worker hosts this attempt's store (after its join: torch is imported then)
        hosted = [h.workers[0].execute.remote(rendezvous.host_store, master_addr, master_port,
                                              cfg.distributed.timeout_s)] if is_script else []
        backends = self._gather(joins, "rendezvous")
        stages["process group"] = time.time() - t0 - sum(stages.values())
        if hosted and (why := self._gather(hosted, "rendezvous")[0]):
            self.out(f"rendezvous: cannot host the scripts' store in rank 0's worker ({why}); "
                     "rank 0's script hosts it")
            self._gather([w.execute.remote(rendezvous.use_agent_store, False) for w in h.workers], "rendezvous")
        self._gather(prepared, "start")
        if s.gpus_per_worker > 0 and not in_place:  # kept workers' listeners still run
            self._listen_for_xids(infos)
        if h.health is not None:
            ray.get(h.health.reset.remote())
        return {"workers": [{"rank": r, **info} for r, info in enumerate(infos)], "world": world,
                "nodes": len({i["node_id"] for i in infos}), "backend": backends[0],
                "master": f"{master_addr}:{master_port}", "seconds": time.time() - t0, "in_place": in_place,
                "standby_used": used, "standby_boosted": boosted, "stages": stages}

    def _new_spare(self, name: str, node: str):
        """A standby worker: on `node`, asking for no resources (orchestrator/standby.py)."""
        return _worker_actor().options(name=name, num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote()

    def _fill_standby(self, progress: dict) -> None:
        """Once this group has done its first step, spares for the next restart (started then,
        not before: their imports would slow this group's start on a busy node)."""
        if self.standby is None:
            return
        if warmed := self.standby.warmed():
            self.out(f"standby: {warmed[0]} spare worker(s) warm ({warmed[1]:.1f}s)")
        if self.fill_after is None or progress.get("step", -1) < self.fill_after:
            return
        self.fill_after = None
        s = self.cfg.scaling
        try:
            self.standby.fill(self.standby.wanted(self.nodes, cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker)))
        except Exception as e:  # never a reason to stop training
            self.out(f"standby workers not started ({type(e).__name__}: {e})")

    def _start_relays(self, attempt: int) -> None:
        """A relay per node that gets one (telemetry.relay), starting while the workers do; a rank
        whose relay fails calls the run's actors itself."""
        t = self.cfg.telemetry
        self.h.relays = Relays(f"{self.cfg.run.name}:{self.run_id}")
        self.h.relays.start(relay_nodes(t.relay.value, self.nodes), attempt=attempt, monitor=self.h.health,
                            metrics=self.h.metrics, heartbeat_s=self.cfg.hang.heartbeat_s, flush_every_s=t.flush_every_s)

    def _listen_for_xids(self, infos: list[dict]) -> None:
        """An NVML Xid listener on each node of the group, in its first rank's process (so for as
        long as the group runs), reporting `gpu_xid` events (orchestrator/hang/xid.py)."""
        by_node: dict[str, tuple[object, dict[int, int]]] = {}
        for r, (w, info) in enumerate(zip(self.h.workers, infos, strict=True)):
            _, gpus = by_node.setdefault(info["node_id"], (w, {}))
            for g in info.get("gpu_ids", []):  # Ray's GPU ids are the node's device indices, as NVML numbers them
                if str(g).isdigit():
                    gpus[int(g)] = r
        refs = [w.execute.options(concurrency_group=CONTROL).remote(xid.listen, self.h.metrics, node, gpus)
                for node, (w, gpus) in by_node.items()]
        try:
            answers = ray.get(refs, timeout=60)
        except Exception as e:  # never a reason not to train
            self.out(f"Xid listeners did not start ({type(e).__name__}); training goes on without them")
            return
        for node, why in zip(by_node, answers, strict=True):
            if why:
                self.out(f"Xid listener off on node {cluster.node_label(node)}: {why}")

    def _check_storage(self, infos: list[dict]) -> None:
        """Every node of the group must see the checkpoint location and the dataset (one worker per node asks)."""
        by_node = {}
        for w, info in zip(self.h.workers, infos, strict=True):
            by_node.setdefault(info["node_id"], w)
        cfg = self.cfg
        uri = ray.get(self.h.checkpoints.info.remote())["uri"]
        data = cfg.data.uri if cfg.entrypoint.kind == "builtin" else None
        visibility.check(lambda node, fn, *args: self._gather([by_node[node].execute.remote(fn, *args)], "start")[0],
                         list(by_node), checkpoint_uri=uri, checkpoint_options=cfg.checkpoint.storage_options,
                         data_uri=data, data_options=cfg.data.storage_options)

    def train(self, step0: int | None, source_uri: str | None, skipped: tuple[int, ...], snapshot=None) -> None:
        """snapshot: a checkpointing.memory.Choice to restore from instead of the checkpoint of step0."""
        h = self.h
        run = {"builtin": rank.run, "function": entrypoints.run_function,
               "script": script.run_script}[self.cfg.entrypoint.kind]
        config = self.cfg.to_dict()
        snaps = self._snapshot_args(snapshot.step if snapshot else step0, snapshot)
        self.refs = [w.execute.remote(rank.with_config, run, config, metrics=h.metrics, checkpoints=h.checkpoints,
                                      health_monitor=h.health, restore_step=step0, restore_uri=source_uri,
                                      skipped=list(skipped), relay=h.relays.of(self.nodes[r]) if h.relays else None,
                                      **snaps[r])
                     for r, w in enumerate(h.workers)]
        self.pending = list(self.refs)
        resume = snapshot.step if snapshot else step0
        self.fill_after = resume if resume is not None else 0

    def _snapshot_args(self, resume_at: int | None, snapshot) -> list[dict]:
        """Per rank: where its snapshots go (the keeper on its own node and the one on the next
        node: Keepers.targets) and the snapshot to restore. Keepers drop what is newer than where
        this group resumes."""
        world = len(self.h.workers)
        if not self.cfg.checkpoint.memory_every_steps:
            return [{} for _ in range(world)]
        k = self._keepers()
        k.ensure(self.nodes, self.attempt)
        k.begin(self.attempt, resume_at)
        k.ensure(self.nodes, self.attempt)  # again: begin() forgets keepers that did not answer
        targets = Keepers.targets(self.nodes)
        if len(set(self.nodes)) == 1 and not k.said_alone:
            k.said_alone = True
            self.alert("snapshot_local_only", "warning", "in-memory snapshots: the group is on one node, so they are "
                       "kept on it only and do not survive its loss (durable checkpoints do)")
        args = [{"snapshot_to": {"keepers": [(t, k.by_node[t]) for t in targets[n]], "attempt": self.attempt,
                                 "run_id": self.run_id}} for n in self.nodes]
        if snapshot is not None:  # a keeper gone since the choice is None: the rank tries the next copy
            source = {"step": snapshot.step,
                      "holders": [[(n, k.by_node.get(n)) for n in snapshot.holders[r]] for r in range(world)]}
            for a in args:
                a["snapshot_from"] = source
        return args

    def _keepers(self) -> Keepers:
        if self.h.keepers is None:
            self.h.keepers = Keepers(f"{self.cfg.run.name}:{self.run_id}")
        return self.h.keepers

    def snapshot_inventory(self, unreachable: tuple[str, ...] = ()) -> dict[str, list[dict]]:
        """node -> the snapshots its keeper holds, for every keeper still alive and not on an
        unreachable node."""
        return self.h.keepers.inventory(unreachable=unreachable) if self.h.keepers is not None else {}

    def wait(self, timeout_s: float) -> list[dict] | None:
        """The ranks' summaries once every rank has finished, else None after at most timeout_s.
        A failed rank raises GroupError at once (ray.wait returns as soon as one finishes)."""
        done, self.pending = ray.wait(self.pending, num_returns=1, timeout=timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                failure = self._failure(e, self.refs.index(ref), "training")
                raise GroupError(self._lost_peer(failure) if failure.data.get("peer_lost") else failure) from None
        return None if self.pending else self._gather(self.refs, "training")

    def finished_ranks(self) -> frozenset[int]:
        """Ranks whose training call has returned (or failed: wait() says so next)."""
        if not self.pending:
            return frozenset(range(len(self.refs)))
        _, running = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        running = set(running)  # each watchdog look: sets, not lists, at 1,000+ ranks
        return frozenset(r for r, ref in enumerate(self.refs) if ref not in running)

    def poll(self) -> dict | None:
        """Progress and new alerts from the metrics actor; None while it restarts."""
        try:
            polled = ray.get(self.h.metrics.poll.remote(), timeout=5)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None  # ranks keep their batches until it is back
        self._fill_standby(polled["progress"])
        return polled

    def progress(self) -> dict | None:
        try:
            return ray.get(self.h.metrics.progress.remote(), timeout=2)
        except Exception:  # the metrics actor is restarting
            return None

    def take_alerts(self) -> list[dict]:
        return ray.get(self.h.metrics.take_alerts.remote())

    def heartbeats(self) -> dict[int, dict] | None:
        if self.h.health is None:
            return None
        try:
            return ray.get(self.h.health.snapshot.remote(), timeout=5)
        except Exception:
            return None

    def read_processes(self, node: str, pids: list[int]):
        """The ref of a read of `pids`' process states (hang/procstate.py) by a process of ours
        already running on `node`, in its control lane: another rank's worker, else a standby
        spare; None when there is none (the watchdog's Ray task then starts a worker there)."""
        here = [w for w, info in zip(self.h.workers, self.infos, strict=False)
                if info.get("node_id") == node and info.get("pid") not in pids]
        if not here and self.standby is not None:
            here = [w for w, _ in self.standby.spares.get(node, [])]
        if not here:
            return None
        return here[0].execute.options(concurrency_group=CONTROL).remote(procstate.sample, pids)

    def flight_recorder(self, report: dict, folder: Path) -> dict:
        def nudge(request: int) -> None:  # in the control lane: a rank blocked in a collective still answers
            for w in self.h.workers:
                w.execute.options(concurrency_group=CONTROL).remote(serve_dump_now, request)

        return collect_flight_recorder(self.h.health, len(self.nodes), report, folder, self.cfg.hang.heartbeat_s,
                                       nudge)

    def check_suspects(self, report: dict) -> dict | None:
        return check_suspects(report, self.nodes, self.cfg.hang.node_check_timeout_s, self.out)

    def request_stop(self) -> None:
        """`orchestrator stop`: each rank is told in its worker's control lane (the training call
        keeps running); the ranks agree on a step, save it and end (orchestrator/stopping.py)."""
        for w in self.h.workers:
            w.execute.options(concurrency_group=CONTROL).remote(stopping.request)

    def stop(self, *, in_place: bool = False, keep_placement: bool = False) -> bool:
        """Kill the worker group and give back its resources; the run's actors stay. in_place
        (a script run whose failure took only scripts down): end the scripts but keep the workers
        and the placement group, if every worker is alive and answers; returns whether it did.
        keep_placement (a rank died or raised, its node is fine): kill the workers but keep the
        placement group for the next group, which saves removing and reserving it again (up to 1 s);
        reserve() still replaces it when it no longer fits."""
        self.kept = in_place and self._end_scripts()
        if not self.kept:
            for w in self.h.workers:
                try:
                    ray.kill(w)
                except Exception:
                    pass
            if self.refs:  # ray.kill returns at once: wait (bounded) until the ranks' calls end with them,
                ray.wait(self.refs, num_returns=len(self.refs), timeout=STOP_WAIT_S)  # so none commits later
            self.h.workers = []
        self.refs, self.pending = [], []
        if self.h.relays is not None:
            self.h.relays.kill()
        if self.h.checkpoints is not None:
            for r in range(self.cfg.scaling.num_workers):
                self.h.checkpoints.release_rank.remote(r)  # slots of killed writers
        if not (self.kept or keep_placement):
            cluster.release(self.h.placement)  # a lost node's bundles cannot come back; reserve afresh
            self.h.placement = None
        return self.kept

    def _end_scripts(self) -> bool:
        """Every rank's script ended (SIGTERM, SIGKILL after SCRIPT_TERM_S) and every rank's call
        returned, by workers that are all still alive. False when one is dead or does not answer."""
        if not self.h.workers or self.h.placement is None:
            return False
        ends = [w.execute.options(concurrency_group=CONTROL).remote(script.end_script, SCRIPT_TERM_S)
                for w in self.h.workers]
        try:
            ray.get(ends, timeout=SCRIPT_TERM_S + 30)
        except Exception:  # a dead worker, or one too busy to answer: the full restart
            return False
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=STOP_WAIT_S) if self.refs else ([], [])
        if len(done) < len(self.refs):
            return False
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return False
            except Exception:  # the script's failure: expected
                pass
        return True

    def teardown(self) -> None:
        if not ray.is_initialized():
            return
        if self.h.keepers is not None:
            self.h.keepers.kill()
        if self.h.relays is not None:
            self.h.relays.kill()
        if self.standby is not None:
            self.standby.kill()
        for actor in (self.h.metrics, self.h.checkpoints):  # writes queued for a tracking server go out before a kill
            if actor is not None:
                try:
                    ray.get(actor.close.remote(), timeout=60)
                except Exception:
                    pass
        for actor in self.h.workers + [a for a in (self.h.metrics, self.h.checkpoints, self.h.health) if a is not None]:
            try:
                ray.kill(actor)
            except Exception:
                pass
        cluster.release(self.h.placement)
        ray.shutdown()  # stops an embedded cluster; only disconnects from an external one

    # --- failures ---------------------------------------------------------------------------

    def node(self, rank: int | None) -> str | None:
        return self.nodes[rank] if rank is not None and 0 <= rank < len(self.nodes) else None

    def _gather(self, refs: list, phase: str, ranks: list[int] | None = None) -> list:
        """ray.get, with a failure turned into GroupError naming the rank, its node and the cause."""
        ranks = ranks if ranks is not None else list(range(len(refs)))
        try:
            return ray.get(refs)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise GroupError(self._failure(e, _failed_rank(refs, ranks), phase)) from None

    def _failure(self, e: Exception, r: int | None, phase: str) -> Failure:
        f = describe(e, r, phase, self.nodes, sdc_every=self.cfg.health.sdc_check_every)
        if (phase == "training" and self.cfg.entrypoint.kind == "script" and isinstance(e, ray.exceptions.RayTaskError)
                and isinstance(e.cause, UserCodeError)):
            f.data["script_exit"] = True  # the script ended, its worker did not: a restart in place can do
        return f

    def _lost_peer(self, first: Failure) -> Failure:
        """`first`: a rank's collective failed because a peer went away. Blame the peer, not the
        rank that happened to report first: wait (bounded) for Ray's account of the other ranks
        (a dead actor, a real exception, a node declared dead), and failing that, the rank on
        the address the errors name (peer_loss.py)."""
        reports = {first.rank: first.traceback or first.message}
        finished: set[int] = set()
        deadline = time.monotonic() + PEER_LOSS_WAIT_S
        while True:
            dead = {n for n in set(self.nodes) if n} - set(cluster.node_ips())
            on_dead = peer_loss.ranks_on(self.nodes, dead)
            if on_dead:
                r = on_dead[0]
                return Failure(FailureKind.NODE_LOST, f"rank {r} was lost with its node {self.node(r)} during "
                               f"training{_seen_by(reports)}", rank=r, node_id=self.node(r),
                               data={"peers_reported": sorted(reports)})
            if not self.pending or time.monotonic() >= deadline:
                break
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=1.0)
            for ref in done:
                r = self.refs.index(ref)
                try:
                    ray.get(ref)
                    finished.add(r)
                    continue
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                    f = self._failure(e, r, "training")
                if "peer_lost" not in f.data:  # Ray's own verdict (a dead actor), or a real error
                    return Failure(f.kind, f.message + _seen_by(reports), rank=f.rank, node_id=f.node_id,
                                   step=f.step, traceback=f.traceback, data={**f.data, "peers_reported": sorted(reports)})
                reports[r] = f.traceback or f.message
        r = peer_loss.suspect(reports, self.ips, finished)
        if r is None:
            return first
        return Failure(FailureKind.DIED, f"rank {r} stopped answering during training: rank(s) "
                       f"{', '.join(map(str, sorted(reports)))} lost their connection to it at {self.ips[r]} "
                       f"(Ray had not reported it within {PEER_LOSS_WAIT_S:.0f}s)", rank=r, node_id=self.node(r),
                       traceback=first.traceback, data={"peers_reported": sorted(reports), "unconfirmed": True})


def _worker_actor():
    return ray.remote(concurrency_groups={CONTROL: 1})(TrainWorker)  # CONTROL: beside the training call


def _seen_by(reports: dict[int, str]) -> str:
    return f" (rank(s) {', '.join(map(str, sorted(reports)))} lost their connection to it first)" if reports else ""


def _failed_rank(refs: list, ranks: list[int]) -> int | None:
    for ref, r in zip(refs, ranks, strict=True):
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
            return r
        except ray.exceptions.GetTimeoutError:
            continue
    return None
