"""The examples in examples/ run as their READMEs say, on the session's Ray cluster."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, cli_json, run_cli

pytestmark = pytest.mark.ray


def test_the_digits_function_learns(home, ray_address):
    proc = run_cli("launch", str(REPO / "examples" / "digits.yaml"), "train.max_steps=200",
                   "checkpoint.every_steps=50", "--address", ray_address, home=home, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = cli_json("runs", home=home)[-1]["id"]
    acc = cli_json("metrics", run_id, "--key", "eval/accuracy", "--rank", "0", home=home)["points"]
    assert acc and acc[-1]["step"] == 199 and acc[-1]["value"] > 0.85, acc


def test_the_torchrun_script_example_runs_from_its_config(home, ray_address):
    proc = run_cli("launch", str(REPO / "examples" / "torchrun_ddp.yaml"), "--address", ray_address, home=home,
                   timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = cli_json("runs", home=home)[-1]["id"]
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", "0", home=home)["points"]
    assert [p["step"] for p in pts] == list(range(50)) and pts[-1]["value"] < pts[0]["value"]
