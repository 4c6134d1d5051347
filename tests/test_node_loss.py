"""Node loss on a multi-node cluster on one machine (ray.cluster_utils.Cluster): elastic recovery on
the nodes that remain, the same data order, and regrowth when a node comes back."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import cli_json, launch_in_background, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()  # only the raylets this fixture started


def expected_fingerprints(data_uri: str, seed: int, batch: int, steps: int) -> list[float]:
    from dataloading.dataset import TokenDataset
    from dataloading.sampler import GlobalSampler, batch_fingerprint

    sampler = GlobalSampler(len(TokenDataset(data_uri, "train")), batch, seed)
    return [float(batch_fingerprint(sampler.global_batch(s))) for s in range(steps)]


def test_node_loss_shrinks_then_regrows_with_the_same_data_order(tmp_path, home, tiny_data, cluster):
    c, nodes = cluster
    steps = 600
    released = tmp_path / "released"  # paced until the group has regrown, then at full speed
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": steps, "eval_every": 0},
                      scaling={"num_workers": 2, "min_workers": 1, "start_timeout_s": 60},
                      checkpoint={"every_steps": 10}, fault_tolerance={"max_restarts": 3, "backoff_s": 0.1},
                      model={"factory": "tests.user_models:slow_gpt",
                             "kwargs": {"pause_s": 0.02, "release_path": str(released)}})
    proc = launch_in_background(cfg, home=home, address=c.address, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # generous: a busy machine is slow

        def step_reached(step):
            while time.monotonic() < deadline:
                runs = cli_json("runs", home=home) if (home / "store.db").exists() else []
                if runs and "train/loss" in cli_json("metrics", runs[0]["id"], home=home)["keys"]:
                    pts = cli_json("metrics", runs[0]["id"], "--key", "train/loss", "--rank", "0", home=home)["points"]
                    if pts and pts[-1]["step"] >= step:
                        return runs[0]["id"]
                time.sleep(0.5)
            raise AssertionError(f"never reached step {step}")

        run_id = step_reached(25)
        workers = cli_json("show", run_id, home=home)["meta"]["workers"]
        victim = next(n for n in nodes if n.node_id == workers[1]["node_id"])
        c.remove_node(victim)  # rank 1's node is gone
        from orchestrator.store import Store

        while time.monotonic() < deadline:  # going on with one worker, and recovered
            attempts = Store(home).attempts(run_id)
            if len(attempts) == 2 and attempts[1]["recovery_s"] is not None:
                break
            time.sleep(0.3)
        assert len(cli_json("show", run_id, home=home)["meta"]["workers"]) == 1
        c.add_node(num_cpus=1)  # capacity is back
        while time.monotonic() < deadline and proc.poll() is None:  # the regrown group has started
            if len(Store(home).attempts(run_id)) >= 3:
                break
            time.sleep(0.3)
        released.touch()
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "elastic: 1 of 2 workers fit now" in out and "RESIZE: regrowing from 1 to 2 workers" in out, out

    attempts = Store(home).attempts(run_id)
    assert [a["status"] for a in attempts] == ["failed", "resized", "completed"], attempts
    assert attempts[0]["cause"] in ("node_lost", "died") and attempts[0]["rank"] == 1
    # at most the interval, plus the steps of a checkpoint still uploading when the node went
    assert attempts[0]["steps_lost"] <= 20
    fps = cli_json("metrics", run_id, "--key", "data/batch_fingerprint", "--rank", "0", home=home)["points"]
    assert [p["step"] for p in fps] == list(range(steps))
    assert [p["value"] for p in fps] == expected_fingerprints(tiny_data, 1, 8, steps)  # same data, whatever the size
