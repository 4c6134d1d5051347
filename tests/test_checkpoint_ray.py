"""The driver path on a real local Ray cluster: 2 workers write committed checkpoints through the
coordinator, and `orchestrator checkpoints RUN --json` lists them."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only

import pytest

from checkpointing.layout import scan
from checkpointing.loader import load_latest
from checkpointing.storage import open_fs
from tests import s3_server
from tests.conftest import cli_json, run_cli, tiny_config

moto_server, s3 = s3_server.moto_server, s3_server.s3  # the fixtures, under their own names

pytestmark = pytest.mark.ray

SMALL = {"model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "train": {"max_steps": 12, "eval_every": 0}}


def test_launch_writes_committed_checkpoints_and_lists_them(tmp_path, home, tiny_data, ray_address):
    dest = tmp_path / "ckpts"
    cfg = tiny_config(tmp_path, tiny_data, checkpoint={"uri": str(dest), "every_steps": 5}, **SMALL)
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    assert "completed" in proc.stdout
    run_id = cli_json("runs", home=home)[-1]["id"]

    report = cli_json("checkpoints", run_id, home=home)
    rows = report["checkpoints"]
    assert report["uri"] == str(dest)
    assert [(r["step"], r["status"], r["present"]) for r in rows] == [(5, "committed", True), (10, "committed", True),
                                                                     (12, "committed", True)]
    assert all(r["bytes"] > 0 and r["blocked_s"] >= 0 and r["upload_s"] > 0 for r in rows)

    fs, root = open_fs(str(dest))
    assert scan(fs, root).committed == [5, 10, 12]
    ck = load_latest(str(dest), rank=1)
    assert ck.step == 12 and ck.meta["run_id"] == run_id and ck.meta["world_size"] == 2
    assert ck.rank_state["sampler"]["samples_consumed"] == 12 * 8
    assert ck.meta["config"]["checkpoint"]["every_steps"] == 5

    keys = cli_json("metrics", run_id, home=home)["keys"]
    assert {"ckpt/blocked_s", "ckpt/upload_s", "ckpt/bytes"} <= set(keys)
    text = run_cli("checkpoints", run_id, "--verify", home=home, check=True).stdout
    assert "committed" in text and "corrupt" not in text


def test_bad_checkpoint_destination_is_one_error_line(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, checkpoint={"uri": "nosuchproto://bucket/x"}, **SMALL)
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "checkpoint.uri='nosuchproto://bucket/x'" in err[0], proc.stderr


def test_launch_to_s3_survives_a_checkpoint_the_store_refuses(tmp_path, home, tiny_data, ray_address, s3):
    """Workers write through the throttling proxy; one checkpoint is refused every time (503
    SlowDown); the run completes, that checkpoint is reported failed, the others commit."""
    proxy, bucket, options = s3
    proxy.add("503", method="PUT", path_contains="step_00000010/", times=-1)
    ckpt = {"uri": f"s3://{bucket}/runs/tiny", "every_steps": 5, "storage_options": options, "retries": 2,
            "backoff_s": 0.01}
    cfg = tiny_config(tmp_path, tiny_data, checkpoint=ckpt, **SMALL)
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    run_id = cli_json("runs", home=home)[-1]["id"]
    rows = cli_json("checkpoints", run_id, home=home)["checkpoints"]
    assert [(r["step"], r["status"]) for r in rows] == [(5, "committed"), (10, "failed"), (12, "committed")]
    assert "reduce your request rate" in rows[1]["error"]
    from orchestrator.store import Store

    alerts = Store(home).events(run_id, "checkpoint_failed")  # from the writer's ckpt/failed metric
    assert alerts and all(a["step"] == 9 for a in alerts)  # metric steps are loop indices: step 10 = index 9
    assert proxy.state.served["503"] >= 3  # the first try and both retries of at least one file
    fs, root = s3_server.open_s3(f"s3://{bucket}/runs/tiny", options)
    assert load_latest(root, fs=fs, rank=1).step == 12
