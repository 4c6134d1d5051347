"""Runs on a Ray cluster whose nodes are real (tests/netns_cluster.py): a head on the host and
three worker nodes, each in its own network namespace and with its own tmpfs as local disk,
checkpoints in an S3 stand-in every node reaches over the bridge. Through the real CLI: a run
across the three nodes, a node-local checkpoint path, a node crash, a network partition.
What each showed is in docs/MULTINODE.md."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests import netns_cluster as harness
from tests.conftest import ORCH, REPO, tiny_config
from tests.s3_server import storage_options

pytestmark = pytest.mark.ray

netns_cluster, healthy_cluster, bridge_s3 = harness.netns_cluster, harness.healthy_cluster, harness.bridge_s3

WORKERS = {"num_workers": 3, "cpus_per_worker": 1, "start_timeout_s": 60}
BATCH = {"global_batch_size": 12}  # divisible by 3 ranks and by the 2 an elastic run shrinks to


# --- the CLI against the namespaced cluster ---------------------------------------------------------


def orch(cluster, home: Path, *args: str, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=cluster.env(ORCHESTRATOR_HOME=str(home)))
    if check and proc.returncode != 0:
        raise AssertionError(f"orchestrator {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def orch_json(cluster, home: Path, *args: str):
    return json.loads(orch(cluster, home, *args, "--json", check=True).stdout)


class Launch:
    """`orchestrator launch CONFIG --address HEAD` in the background, its output in a file (a
    pipe nobody reads could fill and block it)."""

    def __init__(self, cluster, home: Path, cfg: Path, log: Path):
        self.cluster, self.home, self.log = cluster, home, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([*ORCH, "launch", str(cfg), "--address", cluster.address], cwd=REPO,
                                     env=cluster.env(ORCHESTRATOR_HOME=str(home)), stdout=self._out,
                                     stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch still running after {timeout:.0f}s:\n{self.output()[-4000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the driver this test started; its workers go with the run's job
            self.proc.wait(timeout=30)
        self._out.close()


def wait_until(what: str, deadline: float, check, launch: Launch | None = None, poll_s: float = 0.5):
    """check() until it returns something truthy, at most until deadline; fails early if the
    launch ended."""
    for _ in range(100_000):
        got = check()
        if got:
            return got
        if launch is not None and launch.proc.poll() is not None:
            raise AssertionError(f"launch exited {launch.proc.returncode} while waiting for {what}:\n"
                                 f"{launch.output()[-4000:]}")
        if time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{launch.output()[-4000:]}" if launch else ""))


def the_run(cluster, home: Path) -> str | None:
    if not (home / "store.db").exists():
        return None
    runs = orch_json(cluster, home, "runs")
    return runs[0]["id"] if runs else None


def last_step(cluster, home: Path, run_id: str) -> int:
    if "train/loss" not in orch_json(cluster, home, "metrics", run_id)["keys"]:
        return -1
    points = orch_json(cluster, home, "metrics", run_id, "--key", "train/loss", "--rank", "0")["points"]
    return points[-1]["step"] if points else -1


def committed(uri: str, endpoint: str) -> list[int]:
    """Committed checkpoint steps, read from the bucket itself (`orchestrator checkpoints` cannot
    reach this endpoint: the stored config has storage_options redacted, endpoint_url included)."""
    from checkpointing.layout import scan
    from tests.s3_server import open_s3

    fs, root = open_s3(uri, storage_options(endpoint))
    fs.invalidate_cache()
    return scan(fs, root).committed


def s3_checkpoint(endpoint: str, bucket: str, every: int) -> dict:
    return {"uri": f"s3://{bucket}/run", "every_steps": every, "storage_options": storage_options(endpoint)}


def running_after_checkpoint(cluster, home: Path, launch: Launch, ckpt: dict, min_step: int,
                             deadline: float) -> tuple[str, int]:
    """(run id, a committed checkpoint step) once the run passed min_step with a checkpoint behind it."""
    run_id = wait_until("the run to be recorded", deadline, lambda: the_run(cluster, home), launch)
    endpoint = ckpt["storage_options"]["client_kwargs"]["endpoint_url"]

    def ready():
        steps = committed(ckpt["uri"], endpoint) if last_step(cluster, home, run_id) >= min_step else []
        return steps[-1] if steps else None

    return run_id, wait_until(f"step {min_step} with a committed checkpoint", deadline, ready, launch)


def paced_model(released: Path) -> dict:
    """0.2 s a step (numerics untouched), so the fault lands mid-run; full speed once `released`
    exists (the fault is in: the restarted group need not crawl)."""
    return {"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.2, "release_path": str(released)}}


def workers_on(cluster, home: Path, run_id: str) -> list[dict]:
    return orch_json(cluster, home, "show", run_id)["meta"]["workers"]


# --- tests ------------------------------------------------------------------------------------------


def test_a_node_whose_ray_start_timed_out_waiting_for_its_raylet_is_started_again(tmp_path, monkeypatch):
    """Ray's `ray start` waits a fixed 30 s for its raylet to register; on a busy machine that ran
    out once and failed every test of this module. The harness starts such a node again (once),
    and still raises for any other exit."""
    class Exited:
        pid, returncode = 0, 1

        def poll(self):
            return 1

    c = harness.NetnsCluster(tag="t")
    node = harness.Node(1, "10.0.0.11", tmp_path, tmp_path / "n1.log", netns="orcht-n1", proc=Exited())
    c.nodes = [harness.Node(0, "10.0.0.1", tmp_path, tmp_path / "n0.log"), node]
    restarted = []
    monkeypatch.setattr(c, "restart_node", restarted.append)
    node.log.write_text("=== start 1: ray start\nException: The current node timed out during startup. This could\n")
    assert c._check_running(node, restart=True) is True and restarted == [1] and c.restarts
    with pytest.raises(harness.HarnessError, match="node1's `ray start` exited 1"):
        c._check_running(node, restart=False)  # the last try: no more restarts
    node.log.write_text(node.log.read_text() + "=== start 2: ray start\nValueError: something else\n")
    with pytest.raises(harness.HarnessError, match="something else"):
        c._check_running(node, restart=True)  # this incarnation failed otherwise
    assert restarted == [1]



def test_each_node_has_its_own_disk_address_and_hostname(healthy_cluster):
    """The harness itself: a file on one node's local disk is invisible to the others and to the
    host; each node answers on its own address and hostname; a full disk is that node's alone."""
    cluster = healthy_cluster
    local = cluster.local_dir
    marker = local / f"mark-{uuid.uuid4().hex[:8]}"
    write = "import sys; f = open(sys.argv[1], 'wb'); f.write(sys.argv[2].encode() * 4096); f.close()"
    try:
        cluster.run_on(1, [cluster.python, "-c", write, str(marker), "n"])
        assert cluster.run_on(1, ["wc", "-c", str(marker)]).stdout.split()[0] == "4096"
        for index in (2, 3):
            assert cluster.run_on(index, ["test", "-e", str(marker)], check=False).returncode == 1
        assert not marker.exists()  # the host's (and the head's) directory behind the same path
        for node in cluster.worker_nodes:
            seen = cluster.run_on(node.index, ["sh", "-c", "hostname; ip -4 -o addr show dev eth0"]).stdout
            assert node.hostname in seen and f"inet {node.ip}/" in seen, seen

        held = cluster.fill_disk(2)
        assert held >= 0.9 * cluster.local_disk_mb * 2**20
        full = cluster.run_on(2, [cluster.python, "-c", write, str(local / "more"), "x"], check=False)
        assert full.returncode != 0 and "No space left on device" in full.stderr, full.stderr
        cluster.run_on(1, [cluster.python, "-c", write, str(local / "more"), "y"])  # node 1's disk is its own
    finally:
        cluster.free_disk(2)
        cluster.run_on(1, ["rm", "-f", str(marker), str(local / "more")])
        cluster.run_on(2, ["rm", "-f", str(local / "more")])


def test_run_spans_three_nodes_and_its_checkpoint_loads_on_another_node(tmp_path, tiny_data, healthy_cluster,
                                                                         bridge_s3):
    """3 ranks, one per namespaced node (the head has no CPU for them): gloo over the bridge,
    every rank writing its part of each checkpoint to the shared S3 stand-in."""
    cluster, (endpoint, make_bucket) = healthy_cluster, bridge_s3
    home = tmp_path / "home"
    cfg = tiny_config(tmp_path, tiny_data, scaling=WORKERS, data=BATCH, train={"max_steps": 12, "eval_every": 0},
                      checkpoint=s3_checkpoint(endpoint, make_bucket(), 6))
    proc = orch(cluster, home, "launch", str(cfg), "--address", cluster.address, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    run = orch_json(cluster, home, "show", the_run(cluster, home))
    assert run["status"] == "completed"
    workers = run["meta"]["workers"]
    by_node = {n.node_id: n for n in cluster.worker_nodes}
    assert sorted(w["rank"] for w in workers) == [0, 1, 2]
    assert len({w["node_id"] for w in workers}) == 3 and {w["node_id"] for w in workers} == set(by_node), workers
    for w in workers:  # each rank ran where Ray says, with that node's own address and hostname
        node = by_node[w["node_id"]]
        assert (w["ip"], w["hostname"]) == (node.ip, node.hostname), (w, node)
    assert committed(run["config"]["checkpoint"]["uri"], endpoint) == [6, 12]

    # the checkpoint in the shared store loads on a namespaced node too (over the bridge)
    code = ("import json,sys; from checkpointing.loader import load_latest; "
            "c = load_latest(sys.argv[1], storage_options=json.loads(sys.argv[2])); print(c.step)")
    out = cluster.run_on(3, [cluster.python, "-c", code, run["config"]["checkpoint"]["uri"],
                             json.dumps(storage_options(endpoint))], timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "12", out.stdout + out.stderr


def test_node_local_checkpoint_path_is_refused(tmp_path, tiny_data, healthy_cluster):
    """checkpoint.uri on the nodes' local disks: the same path on every node, a different tmpfs
    behind it on each. Refused before training, naming the nodes that cannot see it (issue 12
    item 3), instead of checkpoints that scatter across the nodes."""
    cluster = healthy_cluster
    home = tmp_path / "home"
    uri = str(cluster.local_dir / f"ckpt-{uuid.uuid4().hex[:8]}")
    cfg = tiny_config(tmp_path, tiny_data, scaling=WORKERS, data=BATCH, train={"max_steps": 8, "eval_every": 0},
                      checkpoint={"uri": uri, "every_steps": 4}, fault_tolerance={"max_restarts": 1})
    proc = orch(cluster, home, "launch", str(cfg), "--address", cluster.address, timeout=240)

    # what every node holds at that path afterwards (the host's, the head's, is a plain directory)
    held = {n.name: sorted(cluster.run_on(n.index, ["find", uri, "-type", "f"], check=False).stdout.split())
            for n in cluster.worker_nodes}
    held["head"] = sorted(str(p) for p in Path(uri).rglob("*") if p.is_file())
    print(f"launch exited {proc.returncode}: {proc.stderr.strip()[-500:]}\nfiles at {uri} per node: {held}")
    evidence = f"exit {proc.returncode}; files per node: {held}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert proc.returncode != 0, "a node-local checkpoint.uri was accepted: " + evidence
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.uri" in lines[0], evidence
    group = {w.node_id for w in cluster.worker_nodes}
    named = {n for n in group if n[:12] in lines[0]}
    assert len(named) >= 2, f"the message should name the nodes involved: {lines[0]}"  # the writer and the blind ones
    assert "object store" in lines[0], lines[0]  # and the fix
    assert not any(f for files in held.values() for f in files if "step_" in f), evidence  # nothing was trained
    run_id = the_run(cluster, home)
    assert run_id is None or last_step(cluster, home, run_id) == -1, evidence


def test_partitioned_node_is_named_as_the_culprit(tmp_path, tiny_data, healthy_cluster, bridge_s3):
    """One node's link goes down mid-run: its rank's heartbeats stop, the others wait in the
    all-reduce. The stall names that rank and its node well before Ray would declare the node dead
    (5 failed health checks of 10 s + 3 s: about 65 s, docs/MULTINODE.md); the run goes on without
    the node. The link comes back when the run is over."""
    cluster, (endpoint, make_bucket) = healthy_cluster, bridge_s3
    home = tmp_path / "home"
    steps = 60
    ckpt_cfg = s3_checkpoint(endpoint, make_bucket(), 5)
    cfg = tiny_config(tmp_path, tiny_data, scaling={**WORKERS, "min_workers": 2}, data=BATCH,
                      train={"max_steps": steps, "eval_every": 0}, checkpoint=ckpt_cfg,
                      fault_tolerance={"max_restarts": 2, "backoff_s": 0.2},
                      hang={"timeout_s": 5, "heartbeat_s": 0.5, "node_check_timeout_s": 5},
                      model=paced_model(tmp_path / "released"))
    launch = Launch(cluster, home, cfg, tmp_path / "launch.log")
    victim = None
    try:
        deadline = time.monotonic() + 200
        run_id, ckpt = running_after_checkpoint(cluster, home, launch, ckpt_cfg, 8, deadline)
        victim_rank = next(w for w in workers_on(cluster, home, run_id) if w["rank"] == 1)
        victim = cluster.node_by_id(victim_rank["node_id"])
        cut = time.monotonic()
        cluster.partition(victim.index)
        (tmp_path / "released").touch()
        code = launch.wait(deadline - time.monotonic())
        ended = time.monotonic() - cut
        seen = {n["node_id"]: n["alive"] for n in cluster.probe()["nodes"]}.get(victim.node_id)
    finally:
        launch.close()
        if victim is not None:
            cluster.heal(victim.index)
    out = launch.output()
    print(f"\npartition of {victim.name}: the run ended {ended:.1f}s after the cut; Ray then had the node "
          f"{'alive' if seen else 'dead'}\n{out}")
    assert code == 0, out[-4000:]
    assert "STALL" in out and f"rank 1 on node {victim.node_id[:12]}" in out, out[-4000:]

    (stall,) = orch_json(cluster, home, "diagnose", run_id)["events"]
    assert stall["kind"] == "stall" and stall["culprits"] == [1], stall
    assert stall["verdict"] == "stopped", stall  # its heartbeats stopped; the other ranks wait in the collective
    assert stall["nodes"] == [victim.node_id], stall  # the culprit node, not just "a rank"
    assert stall["action"].startswith("restarted"), stall

    run = orch_json(cluster, home, "show", run_id)
    first, *rest = run["attempts"]
    assert (first["status"], first["cause"], first["rank"], first["node"]) == ("failed", "hang", 1, victim.node_id), first
    assert rest and rest[-1]["status"] == "completed" and rest[0]["resumed_from_step"] >= ckpt, rest
    assert victim.node_id not in {w["node_id"] for w in run["meta"]["workers"]}  # restarted away from it
    assert len(run["meta"]["workers"]) == 2


@pytest.fixture(scope="module")
def crashed_run(netns_cluster, bridge_s3, tiny_data, tmp_path_factory):
    """One run whose rank-1 node crashes (every process killed at once) after a checkpoint; what
    the tests below look at. Elastic: scaling.min_workers=2."""
    try:
        return _crash_a_node_mid_run(netns_cluster, bridge_s3, tiny_data, tmp_path_factory.mktemp("crash"))
    except AssertionError as e:  # the run itself went wrong: an error, never the expected failure below
        raise RuntimeError(f"the crash run did not go as planned: {e}") from None


def _crash_a_node_mid_run(cluster, bridge_s3, tiny_data, tmp: Path) -> dict:
    endpoint, make_bucket = bridge_s3
    for note in cluster.ensure_healthy():
        print(note)
    home, steps = tmp / "home", 60
    ckpt_cfg = s3_checkpoint(endpoint, make_bucket(), 5)
    cfg = tiny_config(tmp, tiny_data, scaling={**WORKERS, "min_workers": 2}, data=BATCH,
                      train={"max_steps": steps, "eval_every": 0}, checkpoint=ckpt_cfg,
                      fault_tolerance={"max_restarts": 2, "backoff_s": 0.2}, model=paced_model(tmp / "released"))
    launch = Launch(cluster, home, cfg, tmp / "launch.log")
    try:
        deadline = time.monotonic() + 200
        run_id, ckpt = running_after_checkpoint(cluster, home, launch, ckpt_cfg, 8, deadline)
        victim_rank = next(w for w in workers_on(cluster, home, run_id) if w["rank"] == 1)
        victim = cluster.node_by_id(victim_rank["node_id"])
        killed = cluster.crash(victim.index)  # every process of that node, at once
        (tmp / "released").touch()
        code = launch.wait(deadline - time.monotonic())
    finally:
        launch.close()
    out = launch.output()
    print(f"\ncrash of {victim.name} ({len(killed)} processes killed)\n{out}")
    assert code == 0, out[-4000:]
    run = orch_json(cluster, home, "show", run_id)
    points = orch_json(cluster, home, "metrics", run_id, "--key", "train/loss", "--rank", "0")["points"]
    return {"run": run, "out": out, "victim": victim, "victim_pid": victim_rank["pid"], "killed": killed,
            "ckpt": ckpt, "steps": steps, "points": points, "committed": committed(ckpt_cfg["uri"], endpoint),
            "survivors": {n.node_id for n in cluster.worker_nodes if n is not victim}}


def test_node_crash_recovers_elastically_on_the_remaining_nodes(crashed_run):
    r = crashed_run
    run, out = r["run"], r["out"]
    assert r["victim_pid"] in r["killed"]  # rank 1's process went with its node
    assert "elastic: 2 of 3 workers fit now" in out, out[-4000:]
    assert run["status"] == "completed"
    first, *rest = run["attempts"]
    assert first["status"] == "failed", first
    assert rest and rest[-1]["status"] == "completed" and rest[0]["resumed_from_step"] >= r["ckpt"], rest
    workers = run["meta"]["workers"]
    assert len(workers) == 2 and {w["node_id"] for w in workers} == r["survivors"], workers
    assert r["committed"][-1] == r["steps"]
    assert [p["step"] for p in r["points"]] == list(range(r["steps"]))  # every step once, across both attempts


def test_node_crash_is_recorded_as_that_nodes_loss(crashed_run):
    """The survivors' gloo sockets get RSTs at once and their errors reach the driver first; Ray
    declares the node dead ~15 s later. The failure is still the crashed node's, not a survivor's
    exception (orchestrator/peer_loss.py, WorkerGroup._lost_peer)."""
    first = crashed_run["run"]["attempts"][0]
    victim = crashed_run["victim"]
    assert first["cause"] in ("node_lost", "died"), first
    assert (first["rank"], first["node"]) == (1, victim.node_id), (first, victim.node_id)
    restart = next(line for line in crashed_run["out"].splitlines() if "RESTART 1/" in line)
    assert "rank 1 " in restart and victim.node_id[:12] in restart, restart  # what the user reads names it too
